package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/portrait-proxy/portrait-proxy/badtags"
	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/cache/redistier"
	"github.com/portrait-proxy/portrait-proxy/front"
	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// The defaults the proxy itself owns; cmd/proxy's flags show them. Every
// other zero value of Config is left to the part it configures, which
// documents and exports its own default (cache.DefaultTTL,
// batcher.DefaultWindow, …).
const (
	DefaultListen       = ":8080"
	DefaultAdminListen  = ":9090"
	DefaultRate         = 100 // the IM default quota of portrait_get, calls per second
	DefaultSetRate      = 200 // the IM default quota of portrait_set, calls per second
	DefaultCallbackPath = "/im/callback"
	DefaultDrainTimeout = 10 * time.Second
)

// New builds the proxy and binds its listeners. On error nothing is left
// running. The parts are built in the order the lookup path needs them:
// the upstream clients, the Redis connection and tier, the limiters, the
// batcher, the cache, and then the listeners in front of them.
func New(cfg Config) (_ *Proxy, err error) {
	if cfg, err = cfg.resolve(); err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger, reg: cfg.Registry}
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.reg == nil {
		p.reg = prometheus.NewRegistry()
		p.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	p.m = metrics.New(p.reg)
	p.m.BuildInfo.WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	defer func() {
		if err != nil {
			p.closeListeners()
		}
	}()
	up, err := p.buildUpstream()
	if err != nil {
		return nil, err
	}
	if err = p.buildRedis(); err != nil {
		return nil, err
	}
	lim, setLim, err := p.buildLimiters()
	if err != nil {
		return nil, err
	}
	if err = p.buildBatcher(up.lookups, lim); err != nil {
		return nil, err
	}
	if err = p.buildCache(); err != nil {
		return nil, err
	}
	if err = p.buildAPI(up, setLim); err != nil {
		return nil, err
	}
	if err = p.buildAdmin(); err != nil {
		return nil, err
	}
	return p, nil
}

// resolve fills in the defaults the proxy owns and checks what New cannot
// do without.
func (cfg Config) resolve() (Config, error) {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.AdminListen == "" {
		cfg.AdminListen = DefaultAdminListen
	}
	if cfg.AdminIdentifier == "" {
		// Resolved here, once: the upstream signer and the callers' check
		// must use the same name.
		cfg.AdminIdentifier = im.DefaultAdministrator
	}
	if cfg.Rate == 0 {
		cfg.Rate = DefaultRate
	}
	if cfg.SetRate == 0 {
		cfg.SetRate = DefaultSetRate
	}
	if cfg.CallbackPath == "" {
		cfg.CallbackPath = DefaultCallbackPath
	}
	switch {
	case cfg.SDKAppID == 0:
		return cfg, errors.New("proxy: -sdkappid is required (or -demo)")
	case cfg.SecretKey == "":
		return cfg, errors.New("proxy: the secret key is required: set PROXY_SECRET_KEY or TIM_SECRET_KEY (or -demo)")
	case (cfg.TLSCert == "") != (cfg.TLSKey == ""):
		return cfg, errors.New("proxy: -tls-cert and -tls-key go together")
	}
	return cfg, nil
}

func buildVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "devel"
}

// clients are the upstream HTTP clients, over one connection pool for
// lookups, sets and forwarded calls.
type clients struct {
	transport *http.Transport
	lookups   *upstream.Client
	// sets makes portrait_set calls: they are not lookups and stay out of
	// upstream_calls_total (the lookup quota's figure).
	sets *upstream.Client
}

func (p *Proxy) buildUpstream() (c clients, err error) {
	cfg := p.cfg
	p.signer = usersig.NewSigner(cfg.SecretKey, cfg.SDKAppID, cfg.AdminIdentifier, 0, nil)
	c.transport = upstream.NewTransport()
	c.lookups, err = upstream.New(upstream.Config{
		BaseURL: cfg.Upstream, Signer: p.signer, Timeout: cfg.UpstreamTimeout, Transport: c.transport,
		Observe: func(k im.Kind, d time.Duration, err error) {
			p.m.UpstreamCalls.WithLabelValues(k.String()).Inc()
			p.m.UpstreamDuration.Observe(d.Seconds())
			if err != nil {
				p.failLog.log(p.log, k, err)
			}
		},
	})
	if err != nil {
		return c, err
	}
	c.sets, err = upstream.New(upstream.Config{
		BaseURL: cfg.Upstream, Signer: p.signer, Timeout: cfg.UpstreamTimeout, Transport: c.transport,
		Observe: func(k im.Kind, d time.Duration, err error) {
			if err != nil {
				p.failLog.log(p.log, k, err)
			}
		},
	})
	return c, err
}

// buildRedis connects to Redis and makes the shared tier, when Redis is
// configured; without it redis_up stays 0.
func (p *Proxy) buildRedis() (err error) {
	cfg := p.cfg
	if cfg.Redis == "" {
		p.m.RedisUp.Set(0)
		return nil
	}
	if p.rclient, err = redistier.NewClient(cfg.Redis, redistier.ClientOptions{Password: cfg.RedisPassword, CAFile: cfg.RedisCA}); err != nil {
		return err
	}
	rc := p.rclient
	metrics.RegisterRedisPool(p.reg, func() metrics.PoolStats {
		st := rc.PoolStats()
		return metrics.PoolStats{Hits: st.Hits, Misses: st.Misses, Timeouts: st.Timeouts,
			TotalConns: st.TotalConns, IdleConns: st.IdleConns, StaleConns: st.StaleConns}
	})
	p.redis, err = redistier.New(redistier.Config{Client: p.rclient, SDKAppID: cfg.SDKAppID,
		TTL: cfg.TTL, StaleTTL: cfg.StaleTTL, ClockSkew: cfg.ClockSkew, Metrics: p.m})
	return err
}

// buildLimiters makes the lookup quota's limiter, which keeps the limiter
// metrics, and portrait_set's own.
func (p *Proxy) buildLimiters() (lookups, sets batcher.Limiter, err error) {
	share := p.cfg.RateFallbackShare
	lookups, err = p.newLimiter("", p.cfg.Rate, p.m, func(on bool) {
		if on {
			p.log.Warn("shared limiter unreachable: using this replica's fallback share of the rate", "share", share)
		} else {
			p.log.Info("shared limiter reachable again")
		}
	})
	if err != nil {
		return nil, nil, err
	}
	sets, err = p.newLimiter(":set", p.cfg.SetRate, nil, nil)
	return lookups, sets, err
}

// newLimiter returns a limiter of rate calls per second: shared by every
// replica through Redis (under the app's key plus suffix) when Redis is
// configured, in-process otherwise. m, if set, receives its figures.
func (p *Proxy) newLimiter(suffix string, rate float64, m *metrics.Metrics, onFallback func(bool)) (batcher.Limiter, error) {
	cfg := p.cfg
	if p.rclient == nil {
		return limiter.NewLocal(limiter.Config{Rate: rate, Guard: cfg.RateGuard, Metrics: m})
	}
	// A permit outlives the longest call by a margin: a replica that dies
	// mid-call frees its slot soon after.
	hold := cfg.UpstreamTimeout
	if hold <= 0 {
		hold = upstream.DefaultTimeout
	}
	return limiter.NewShared(limiter.SharedConfig{Client: p.rclient, App: strconv.FormatUint(cfg.SDKAppID, 10) + suffix,
		Rate: rate, Guard: cfg.RateGuard, MaxHold: hold + 5*time.Second, FallbackShare: cfg.RateFallbackShare,
		OnFallback: onFallback, Metrics: m})
}

// buildBatcher makes the set of tags the upstream refuses and the batcher
// that makes the lookup calls under the lookup quota.
func (p *Proxy) buildBatcher(client *upstream.Client, lim batcher.Limiter) (err error) {
	cfg := p.cfg
	if p.badTags, err = badtags.New(badtags.Config{Custom: cfg.CustomTags, TTL: cfg.BadTagTTL, Client: p.rclient,
		SDKAppID: cfg.SDKAppID, Skew: cfg.ClockSkew, Metrics: p.m}); err != nil {
		return fmt.Errorf("proxy: -custom-tags: %w", err)
	}
	p.batcher, err = batcher.New(batcher.Config{Upstream: client, Limiter: lim, MaxAccounts: cfg.BatchMax, MaxQueue: cfg.MaxQueue,
		Window: cfg.BatchWindow, FillHold: cfg.FillHold, DefaultTags: cfg.DefaultTags, DrainTimeout: cfg.DrainTimeout, Metrics: p.m,
		Tags: p.badTags, RejectTTL: cfg.NegativeTTL})
	return err
}

// buildCache makes the cache: the in-process tier, then Redis's if any,
// then the batcher.
func (p *Proxy) buildCache() (err error) {
	cfg := p.cfg
	var remote cache.Remote
	var coord cache.Coordinator
	if p.redis != nil {
		remote = p.redis
		if cfg.CrossReplica {
			coord = p.redis
		}
	}
	p.cache, err = cache.New(cache.Config{Loader: batchLoader{p.batcher}, Local: cache.NewLocal(cfg.LocalAccounts), Remote: remote, Coordinator: coord,
		TTL: cfg.TTL, StaleTTL: cfg.StaleTTL, NegativeTTL: cfg.NegativeTTL, ClockSkew: cfg.ClockSkew, Metrics: p.m})
	return err
}

// buildAPI makes the drop-in API (lookups, portrait_set, forwarded calls,
// change callbacks) and its server, and binds its listener.
func (p *Proxy) buildAPI(up clients, setLim setLimiter) (err error) {
	cfg := p.cfg
	p.callbackPath = p.callbackReceiver()
	api, err := httpapi.New(httpapi.Config{Lookup: p.cache, SDKAppID: cfg.SDKAppID, Identifier: cfg.AdminIdentifier,
		Key: cfg.SecretKey, Auth: cfg.Auth, AuthNoneWrites: cfg.AuthNoneWrites, MaxAccounts: cfg.MaxAccounts, RequestTimeout: cfg.RequestTimeout,
		Metrics: p.m, Tags: p.badTags, Forward: p.forwardConfig(up.transport),
		Setter: &setter{lim: setLim, client: up.sets, backoff: time.Second}, Changer: p.cache,
		CallbackPath: p.callbackPath, CallbackToken: cfg.CallbackToken, CallbackUnsigned: cfg.CallbackUnsigned,
		CallbackUnsignedRate: cfg.CallbackUnsignedRate, ClockSkew: cfg.ClockSkew})
	if err != nil {
		return err
	}
	p.warnOpen()
	p.api = &http.Server{Handler: api, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10,
		ErrorLog: slog.NewLogLogger(p.log.Handler(), slog.LevelWarn)}
	if cfg.TLSCert != "" {
		if p.certs, err = newCertReloader(cfg.TLSCert, cfg.TLSKey, cfg.TLSReloadEvery, p.log, p.m); err != nil {
			return err
		}
		p.api.TLSConfig = p.certs.tlsConfig()
	}
	if !cfg.NetHTTPOnly {
		p.front, err = front.New(front.Config{Path: im.PathGet, Handler: api, Fallback: p.api, MaxBodyBytes: httpapi.DefaultMaxBody,
			Handoffs: p.m.Handoffs})
		if err != nil {
			return err
		}
	}
	if p.apiLn, err = net.Listen("tcp", cfg.Listen); err != nil {
		return fmt.Errorf("proxy: listen %s: %w", cfg.Listen, err)
	}
	return nil
}

// callbackReceiver is the path change callbacks are received on, or ""
// when the receiver is off: disabled, or nothing would authenticate the
// callbacks and unsigned ones were not asked for.
func (p *Proxy) callbackReceiver() string {
	path := p.cfg.CallbackPath
	if path == "-" {
		return ""
	}
	if p.cfg.CallbackToken == "" && !p.cfg.CallbackUnsigned {
		p.log.Warn("change callbacks are not received: no -callback-token (set the IM console's callback token), and -callback-unsigned not given", "callback_path", path)
		return ""
	}
	return path
}

// forwardConfig is how every other /v4 API is forwarded, over the lookup
// calls' connection pool; nil when forwarding is off.
func (p *Proxy) forwardConfig(transport *http.Transport) *httpapi.ForwardConfig {
	cfg := p.cfg
	if cfg.DisableForward {
		return nil
	}
	return &httpapi.ForwardConfig{Upstream: cfg.Upstream, Transport: transport, Timeout: cfg.UpstreamTimeout,
		MaxBodyBytes: cfg.ForwardMaxBody, Accounts: p.cache,
		OnError: func(service, result string, err error) {
			p.failLog.log(p.log, im.KindTransport, fmt.Errorf("forwarded %s call: %s: %w", service, result, err))
		}}
}

// warnOpen logs what the configuration leaves open to anyone who reaches
// the API port.
func (p *Proxy) warnOpen() {
	cfg := p.cfg
	if p.callbackPath != "" && cfg.CallbackToken == "" {
		p.log.Warn("-callback-unsigned: anyone who reaches the API port can send change callbacks; they only drop tags already cached (their values are not trusted), rate-bounded; set the IM console's callback token to have them checked and applied", "callback_path", p.callbackPath)
	}
	if cfg.Auth != httpapi.AuthNone {
		return
	}
	if cfg.AuthNoneWrites {
		p.log.Warn("caller authentication is OFF (-auth none, -auth-none-writes): anyone who reaches the API port can read every profile AND change any profile (portrait_set) with the app's admin rights")
	} else {
		p.log.Warn("caller authentication is OFF (-auth none): anyone who reaches the API port can read every profile with the app's admin rights (portrait_get); portrait_set is refused (-auth-none-writes would open it)")
	}
}

// buildAdmin makes the admin server (metrics, health, readiness, pprof)
// and binds its listener, unless AdminListen is "-".
func (p *Proxy) buildAdmin() (err error) {
	if p.cfg.AdminListen == "-" {
		return nil
	}
	p.admin = &http.Server{Handler: p.adminMux(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: adminWriteTimeout, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(p.log.Handler(), slog.LevelWarn)}
	if p.adminLn, err = net.Listen("tcp", p.cfg.AdminListen); err != nil {
		return fmt.Errorf("proxy: listen %s: %w", p.cfg.AdminListen, err)
	}
	return nil
}
