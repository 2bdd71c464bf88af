// Package proxy wires the parts of the portrait_get proxy together: the
// upstream client, the limiter, the batcher, the cache tiers, the drop-in
// HTTP API and the admin listener (metrics, health, readiness, pprof).
//
// New builds everything from a Config and binds the listeners; Run serves
// until its context ends and then shuts down in order: readiness fails
// first, the API listener drains (lookups in flight are answered), the
// batcher flushes what is queued, and Run returns. cmd/proxy is a thin
// layer over this package; tests and the load generator use it directly.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/portrait-proxy/portrait-proxy/badtags"
	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/cache/redistier"
	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Config is the whole proxy's configuration; cmd/proxy fills it from flags.
// Zero values take the defaults of the parts (documented there).
type Config struct {
	Listen      string // API address; default ":8080"
	AdminListen string // admin address; default ":9090"; "-" disables
	// Pprof serves the profiling endpoints under /debug/pprof/ on the
	// admin listener (never /debug/pprof/cmdline: the command line may
	// hold secrets). Off by default: profiles reveal the process's memory.
	Pprof bool

	Upstream        string // IM REST API base URL
	SDKAppID        uint64
	AdminIdentifier string // default "administrator"
	SecretKey       string
	UpstreamTimeout time.Duration

	Rate float64 // upstream calls per second; default 100
	// RateFallbackShare is the part of Rate one replica uses while the
	// shared limiter in Redis is unreachable; default 0.3.
	RateFallbackShare float64
	RateGuard         time.Duration // jitter allowance; default limiter.DefaultGuard
	BatchMax          int
	BatchWindow       time.Duration
	FillHold          time.Duration // see batcher.Config.FillHold; default 40ms, negative: off
	DefaultTags       []string

	TTL           time.Duration
	StaleTTL      time.Duration
	NegativeTTL   time.Duration
	LocalAccounts int    // in-process tier size in accounts
	Redis         string // shared tier: see redistier.NewClient; empty: none
	// RedisPassword replaces the password of the Redis URL (AUTH/ACL);
	// RedisCA is a PEM file of roots for rediss:// (default: the system's).
	RedisPassword string
	RedisCA       string
	// CrossReplica coalesces misses across replicas: with Redis, an
	// account missed on several replicas at once is fetched by one of them,
	// at the cost of a claim round trip per miss.
	CrossReplica bool
	Auth         string
	// AuthNoneWrites lets portrait_set through when Auth is "none" (no
	// caller authenticated); without it such a proxy only reads.
	AuthNoneWrites bool
	MaxAccounts    int
	MaxQueue       int // accounts waiting for the quota at most; default 50,000
	RequestTimeout time.Duration
	ShutdownDelay  time.Duration // readiness fails this long before the listener closes
	DrainTimeout   time.Duration

	// SetRate is portrait_set's own quota in calls per second; default 200.
	SetRate float64
	// CallbackPath is where the upstream's change callbacks are received on
	// the API listener; default "/im/callback"; "-" disables the receiver.
	CallbackPath string
	// CallbackToken, when set, is the callback authentication token: a
	// callback must carry Sign = hex(SHA-256(token + RequestTime)).
	// Without it the receiver is not mounted unless CallbackUnsigned says
	// so; unsigned callbacks then only drop tags already cached, at most
	// CallbackUnsignedRate a second (default 100).
	CallbackToken        string
	CallbackUnsigned     bool
	CallbackUnsignedRate float64
	// ClockSkew is how far the upstream's and the replicas' clocks may be
	// apart, for ordering cached values against changes; default 1s.
	ClockSkew time.Duration

	// CustomTags, when not nil, are the custom tags the app configured: a
	// request for any other custom tag is answered 40009 without a call.
	// Nil: tags the upstream refuses are learned (see badtags).
	CustomTags []string
	// BadTagTTL is how long a tag the upstream refused is refused without a
	// call; default 10 minutes.
	BadTagTTL time.Duration
	// DisableForward answers every other /v4 API 60002 (HTTP 404) instead
	// of forwarding it to the upstream with the caller's own credentials
	// (-forward=false). ForwardMaxBody caps a forwarded request body;
	// default 1 MiB.
	DisableForward bool
	ForwardMaxBody int64
	// TLSCert and TLSKey, both set, are PEM files: the API is then served
	// over TLS (HTTP/2 and HTTP/1.1), and the files are checked every
	// TLSReloadEvery (default 10s) and loaded again when they change.
	TLSCert, TLSKey string
	TLSReloadEvery  time.Duration

	// Demo runs the built-in emulator as the upstream (SDKAppID, identifier
	// and key are then the emulator's). DemoLatency is its added latency.
	Demo        bool
	DemoLatency time.Duration

	Registry *prometheus.Registry // nil: a new one with Go and process collectors
	Logger   *slog.Logger         // nil: slog.Default()
}

// Proxy is a configured, bound proxy. Create it with New; call Run once.
type Proxy struct {
	cfg      Config
	log      *slog.Logger
	reg      *prometheus.Registry
	m        *metrics.Metrics
	sim      *imsim.Server
	simSrv   *http.Server
	simLn    net.Listener
	batcher  *batcher.Batcher
	cache    *cache.Cache
	redis    *redistier.Tier
	badTags  *badtags.Set
	rclient  redis.UniversalClient
	api      *http.Server
	admin    *http.Server
	apiLn    net.Listener
	adminLn  net.Listener
	signer   *usersig.Signer
	ready    atomic.Bool
	upstream string
	failLog  failureLog
	certs    *certReloader // nil without TLS
}

// failureLog writes one line per upstream failure, at most one a second
// per kind, counting what it held back, so an outage cannot flood the log.
type failureLog struct {
	mu   sync.Mutex
	last map[im.Kind]time.Time
	held map[im.Kind]int
}

func (f *failureLog) log(log *slog.Logger, k im.Kind, err error) {
	f.mu.Lock()
	if f.last == nil {
		f.last, f.held = map[im.Kind]time.Time{}, map[im.Kind]int{}
	}
	now := time.Now()
	if now.Sub(f.last[k]) < time.Second {
		f.held[k]++
		f.mu.Unlock()
		return
	}
	held := f.held[k]
	f.last[k], f.held[k] = now, 0
	f.mu.Unlock()
	log.Warn("upstream call failed", "cause", k.String(), "error", err.Error(), "similar_failures_not_logged", held)
}

// New builds the proxy and binds its listeners. On error nothing is left
// running.
func New(cfg Config) (_ *Proxy, err error) {
	if cfg.Listen == "" {
		cfg.Listen = ":8080"
	}
	if cfg.AdminListen == "" {
		cfg.AdminListen = ":9090"
	}
	if cfg.AdminIdentifier == "" {
		cfg.AdminIdentifier = im.DefaultAdministrator
	}
	if cfg.Rate == 0 {
		cfg.Rate = 100
	}
	if cfg.SetRate == 0 {
		cfg.SetRate = 200
	}
	if cfg.CallbackPath == "" {
		cfg.CallbackPath = "/im/callback"
	}
	if cfg.ClockSkew <= 0 {
		cfg.ClockSkew = time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	reg := cfg.Registry
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	p := &Proxy{cfg: cfg, log: log, reg: reg, m: metrics.New(reg)}
	version := "devel"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		version = bi.Main.Version
	}
	p.m.BuildInfo.WithLabelValues(version, runtime.Version()).Set(1)
	p.m.Quota.Set(cfg.Rate)
	p.m.RateFactor.Set(1)
	defer func() {
		if err != nil {
			p.closeListeners()
		}
	}()

	if cfg.Demo {
		if err := p.startDemo(); err != nil {
			return nil, err
		}
		if p.cfg.CallbackToken == "" {
			// The demo emulator and the proxy share a token of the run, so
			// the emulator's callbacks are applied as signed ones.
			p.cfg.CallbackToken = strconv.FormatUint(rand.Uint64(), 36) + strconv.FormatUint(rand.Uint64(), 36)
		}
		cfg = p.cfg
	}
	if cfg.SDKAppID == 0 {
		return nil, errors.New("proxy: -sdkappid is required (or -demo)")
	}
	if cfg.SecretKey == "" {
		return nil, errors.New("proxy: the secret key is required: set PROXY_SECRET_KEY or TIM_SECRET_KEY (or -demo)")
	}
	p.upstream = cfg.Upstream
	p.signer = usersig.NewSigner(cfg.SecretKey, cfg.SDKAppID, cfg.AdminIdentifier, 0, nil)
	// One connection pool to the upstream for lookups, sets and forwarded
	// calls.
	transport := upstream.NewTransport()
	client, err := upstream.New(upstream.Config{
		BaseURL: cfg.Upstream, Signer: p.signer, Timeout: cfg.UpstreamTimeout, Transport: transport,
		Observe: func(k im.Kind, d time.Duration, err error) {
			p.m.UpstreamCalls.WithLabelValues(k.String()).Inc()
			p.m.UpstreamDuration.Observe(d.Seconds())
			if err != nil {
				p.failLog.log(log, k, err)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	var remote cache.Remote
	if cfg.Redis != "" {
		if p.rclient, err = redistier.NewClient(cfg.Redis, redistier.ClientOptions{Password: cfg.RedisPassword, CAFile: cfg.RedisCA}); err != nil {
			return nil, err
		}
		rc := p.rclient
		metrics.RegisterRedisPool(reg, func() metrics.PoolStats {
			st := rc.PoolStats()
			return metrics.PoolStats{Hits: st.Hits, Misses: st.Misses, Timeouts: st.Timeouts,
				TotalConns: st.TotalConns, IdleConns: st.IdleConns, StaleConns: st.StaleConns}
		})
		if p.redis, err = redistier.New(redistier.Config{Client: p.rclient, SDKAppID: cfg.SDKAppID,
			TTL: cfg.TTL, StaleTTL: cfg.StaleTTL, ClockSkew: cfg.ClockSkew, Metrics: p.m}); err != nil {
			return nil, err
		}
		remote = p.redis
	} else {
		p.m.RedisUp.Set(0)
	}
	lim, err := p.newLimiter(cfg, "", cfg.Rate, func(on bool) {
		if on {
			p.m.LimiterFallback.Set(1)
			log.Warn("shared limiter unreachable: using this replica's fallback share of the rate", "share", cfg.RateFallbackShare)
		} else {
			p.m.LimiterFallback.Set(0)
			log.Info("shared limiter reachable again")
		}
	})
	if err != nil {
		return nil, err
	}
	setLim, err := p.newLimiter(cfg, ":set", cfg.SetRate, nil)
	if err != nil {
		return nil, err
	}
	// portrait_set calls have their own client: they are not lookups and
	// stay out of upstream_calls_total (the lookup quota's figure).
	setClient, err := upstream.New(upstream.Config{
		BaseURL: cfg.Upstream, Signer: p.signer, Timeout: cfg.UpstreamTimeout, Transport: transport,
		Observe: func(k im.Kind, d time.Duration, err error) {
			if err != nil {
				p.failLog.log(log, k, err)
			}
		},
	})
	if err != nil {
		return nil, err
	}
	if p.badTags, err = badtags.New(badtags.Config{Custom: cfg.CustomTags, TTL: cfg.BadTagTTL, Client: p.rclient,
		SDKAppID: cfg.SDKAppID, Skew: cfg.ClockSkew, Metrics: p.m}); err != nil {
		return nil, fmt.Errorf("proxy: -custom-tags: %w", err)
	}
	p.batcher, err = batcher.New(batcher.Config{Upstream: client, Limiter: lim, MaxAccounts: cfg.BatchMax, Rate: cfg.Rate, MaxQueue: cfg.MaxQueue,
		Window: cfg.BatchWindow, FillHold: cfg.FillHold, DefaultTags: cfg.DefaultTags, DrainTimeout: cfg.DrainTimeout, Metrics: p.m,
		Tags: p.badTags, RejectTTL: cfg.NegativeTTL})
	if err != nil {
		return nil, err
	}
	var coord cache.Coordinator
	if p.redis != nil && cfg.CrossReplica {
		coord = p.redis
	}
	p.cache, err = cache.New(cache.Config{Loader: p.batcher, Local: cache.NewLocal(cfg.LocalAccounts), Remote: remote, Coordinator: coord,
		TTL: cfg.TTL, StaleTTL: cfg.StaleTTL, NegativeTTL: cfg.NegativeTTL, ClockSkew: cfg.ClockSkew, Metrics: p.m})
	if err != nil {
		return nil, err
	}
	callbackPath := cfg.CallbackPath
	if callbackPath == "-" {
		callbackPath = ""
	}
	var forward *httpapi.ForwardConfig
	if !cfg.DisableForward {
		forward = &httpapi.ForwardConfig{Upstream: cfg.Upstream, Transport: transport, Timeout: cfg.UpstreamTimeout,
			MaxBodyBytes: cfg.ForwardMaxBody, Accounts: p.cache,
			OnError: func(service, result string, err error) {
				p.failLog.log(log, im.KindTransport, fmt.Errorf("forwarded %s call: %s: %w", service, result, err))
			}}
	}
	if callbackPath != "" && cfg.CallbackToken == "" && !cfg.CallbackUnsigned {
		log.Warn("change callbacks are not received: no -callback-token (set the IM console's callback token), and -callback-unsigned not given", "callback_path", callbackPath)
		callbackPath = ""
	}
	api, err := httpapi.New(httpapi.Config{Lookup: p.cache, SDKAppID: cfg.SDKAppID, Identifier: cfg.AdminIdentifier,
		Key: cfg.SecretKey, Auth: cfg.Auth, AuthNoneWrites: cfg.AuthNoneWrites, MaxAccounts: cfg.MaxAccounts, RequestTimeout: cfg.RequestTimeout,
		Metrics: p.m, Tags: p.badTags, Forward: forward,
		Setter: &setter{lim: setLim, client: setClient, backoff: time.Second}, Changer: p.cache,
		CallbackPath: callbackPath, CallbackToken: cfg.CallbackToken, CallbackUnsigned: cfg.CallbackUnsigned,
		CallbackUnsignedRate: cfg.CallbackUnsignedRate, ClockSkew: cfg.ClockSkew})
	if err != nil {
		return nil, err
	}
	if callbackPath != "" && cfg.CallbackToken == "" {
		log.Warn("-callback-unsigned: anyone who reaches the API port can send change callbacks; they only drop tags already cached (their values are not trusted), rate-bounded; set the IM console's callback token to have them checked and applied", "callback_path", callbackPath)
	}
	if cfg.Auth == httpapi.AuthNone {
		if cfg.AuthNoneWrites {
			log.Warn("caller authentication is OFF (-auth none, -auth-none-writes): anyone who reaches the API port can read every profile AND change any profile (portrait_set) with the app's admin rights")
		} else {
			log.Warn("caller authentication is OFF (-auth none): anyone who reaches the API port can read every profile with the app's admin rights (portrait_get); portrait_set is refused (-auth-none-writes would open it)")
		}
	}
	p.api = &http.Server{Handler: api, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	if (cfg.TLSCert == "") != (cfg.TLSKey == "") {
		return nil, errors.New("proxy: -tls-cert and -tls-key go together")
	}
	if cfg.TLSCert != "" {
		if p.certs, err = newCertReloader(cfg.TLSCert, cfg.TLSKey, cfg.TLSReloadEvery, log, p.m); err != nil {
			return nil, err
		}
		p.api.TLSConfig = p.certs.tlsConfig()
	}
	if p.apiLn, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("proxy: listen %s: %w", cfg.Listen, err)
	}
	if p.sim != nil && callbackPath != "" {
		// The demo emulator tells this proxy of every change, as IM would.
		p.sim.SetCallback(imsim.Callback{URL: "http://" + loopback(p.Addr()) + callbackPath, Token: cfg.CallbackToken})
	}
	if cfg.AdminListen != "-" {
		p.admin = &http.Server{Handler: p.adminMux(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			WriteTimeout: adminWriteTimeout, IdleTimeout: 60 * time.Second, MaxHeaderBytes: 16 << 10,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		if p.adminLn, err = net.Listen("tcp", cfg.AdminListen); err != nil {
			return nil, fmt.Errorf("proxy: listen %s: %w", cfg.AdminListen, err)
		}
	}
	return p, nil
}

// newLimiter returns a limiter of rate calls per second: shared by every
// replica through Redis (under the app's key plus suffix) when Redis is
// configured, in-process otherwise.
func (p *Proxy) newLimiter(cfg Config, suffix string, rate float64, onFallback func(bool)) (limiter.Limiter, error) {
	if p.rclient == nil {
		return limiter.NewLocal(limiter.Config{Rate: rate, Guard: cfg.RateGuard})
	}
	hold := cfg.UpstreamTimeout
	if hold <= 0 {
		hold = 5 * time.Second
	}
	return limiter.NewShared(limiter.SharedConfig{Client: p.rclient, App: strconv.FormatUint(cfg.SDKAppID, 10) + suffix,
		Rate: rate, Guard: cfg.RateGuard, MaxHold: hold + 5*time.Second, FallbackShare: cfg.RateFallbackShare,
		OnFallback: onFallback})
}

// startDemo starts the emulator on a loopback port and points the proxy at it.
func (p *Proxy) startDemo() error {
	latency := p.cfg.DemoLatency
	if latency == 0 {
		latency = 20 * time.Millisecond
	}
	p.sim = imsim.New(imsim.Config{Behaviour: imsim.Behaviour{Quota: int(p.cfg.Rate),
		CustomTags:     append(slices.Clone(imsim.DefaultCustomTags), "Tag_Profile_Custom_Secret"),
		UnreadableTags: []string{"Tag_Profile_Custom_Secret"},
		NoStandardData: []string{"nostd"}, NoCustomData: []string{"nocustom"}, RejectAccounts: []string{"reject.me"},
	}, Faults: imsim.Faults{Latency: latency}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("proxy: demo emulator: %w", err)
	}
	p.simLn = ln
	p.simSrv = &http.Server{Handler: p.sim, ReadHeaderTimeout: 5 * time.Second}
	go p.simSrv.Serve(ln)
	p.cfg.Upstream = "http://" + ln.Addr().String()
	p.cfg.SDKAppID, p.cfg.AdminIdentifier, p.cfg.SecretKey = p.sim.SDKAppID(), p.sim.Identifier(), p.sim.Key()
	return nil
}

func (p *Proxy) closeListeners() {
	for _, ln := range []net.Listener{p.apiLn, p.adminLn} {
		if ln != nil {
			ln.Close()
		}
	}
	if p.simSrv != nil {
		p.simSrv.Close()
		p.sim.Close()
	}
	if p.cache != nil {
		p.cache.Close()
	}
	if p.rclient != nil {
		p.rclient.Close()
	}
}

// adminWriteTimeout bounds an admin answer; a CPU profile or trace must
// ask for less (pprof refuses a "seconds" beyond the server's write
// timeout).
const adminWriteTimeout = 35 * time.Second

func (p *Proxy) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{Registry: p.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !p.ready.Load() {
			http.Error(w, "not ready\n", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	if p.cfg.Pprof {
		// Not /debug/pprof/cmdline: the command line may carry the secret
		// key or a Redis password. Index answers that path "Unknown
		// profile" (404).
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	return mux
}

// Handler is the drop-in API handler (for in-process benchmarks).
func (p *Proxy) Handler() http.Handler { return p.api.Handler }

// Addr is the API listener's address.
func (p *Proxy) Addr() string { return p.apiLn.Addr().String() }

// AdminAddr is the admin listener's address, or "" when disabled.
func (p *Proxy) AdminAddr() string {
	if p.adminLn == nil {
		return ""
	}
	return p.adminLn.Addr().String()
}

// Emulator is the demo upstream, or nil when not in demo mode.
func (p *Proxy) Emulator() *imsim.Server { return p.sim }

// SDKAppID and AdminIdentifier are the app the proxy serves.
func (p *Proxy) SDKAppID() uint64        { return p.cfg.SDKAppID }
func (p *Proxy) AdminIdentifier() string { return p.cfg.AdminIdentifier }

// Metrics is the proxy's metric set.
func (p *Proxy) Metrics() *metrics.Metrics { return p.m }

// Registry is the registry /metrics serves.
func (p *Proxy) Registry() *prometheus.Registry { return p.reg }

// Ready reports whether /readyz answers 200.
func (p *Proxy) Ready() bool { return p.ready.Load() }

// Run serves until ctx ends, then shuts down in order (see the package
// doc) and returns nil, or the first error that stopped a server.
func (p *Proxy) Run(ctx context.Context) error {
	batchCtx, stopBatcher := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBatcher()
	g, gctx := errgroup.WithContext(ctx)
	batcherDone := make(chan struct{})
	go func() {
		defer close(batcherDone)
		p.batcher.Run(batchCtx)
	}()
	redisCtx, stopRedis := context.WithCancel(context.WithoutCancel(ctx))
	defer stopRedis()
	redisDone := make(chan struct{})
	go func() {
		defer close(redisDone)
		if p.redis != nil {
			p.redis.Run(redisCtx)
		}
	}()
	tagsDone := make(chan struct{})
	go func() {
		defer close(tagsDone)
		p.badTags.Run(redisCtx)
	}()
	if p.certs != nil {
		g.Go(func() error { p.certs.Run(gctx); return nil })
		g.Go(func() error { return serveTLS(p.api, p.apiLn) })
	} else {
		g.Go(func() error { return serve(p.api, p.apiLn) })
	}
	if p.admin != nil {
		g.Go(func() error { return serve(p.admin, p.adminLn) })
	}
	p.ready.Store(true)
	p.log.Info("proxy serving", "api", p.Addr(), "admin", p.AdminAddr(), "upstream", p.upstream,
		"sdkappid", p.cfg.SDKAppID, "rate", p.cfg.Rate, "auth", p.cfg.Auth, "redis", p.cfg.Redis != "",
		"tls", p.certs != nil, "forward", !p.cfg.DisableForward)

	<-gctx.Done()
	p.ready.Store(false)
	p.log.Info("proxy shutting down")
	if p.cfg.ShutdownDelay > 0 && ctx.Err() != nil {
		time.Sleep(p.cfg.ShutdownDelay) // let load balancers see /readyz fail
	}
	drain := p.cfg.DrainTimeout
	if drain <= 0 {
		drain = 10 * time.Second
	}
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	err := p.api.Shutdown(sctx) // in-flight lookups finish: the batcher still runs
	stopBatcher()
	<-batcherDone
	p.cache.Close()
	stopRedis() // after the last write-back was queued: Run flushes it
	<-redisDone
	<-tagsDone
	if p.rclient != nil {
		p.rclient.Close()
	}
	if p.admin != nil {
		p.admin.Shutdown(sctx)
	}
	if p.simSrv != nil {
		p.simSrv.Shutdown(sctx)
		p.sim.Close()
	}
	if gerr := g.Wait(); gerr != nil {
		return gerr
	}
	if err != nil {
		return fmt.Errorf("proxy: shutdown: %w", err)
	}
	p.log.Info("proxy stopped")
	return nil
}

// loopback turns a wildcard listen address into one a local client can dial.
func loopback(addr string) string {
	if strings.HasPrefix(addr, "[::]") || strings.HasPrefix(addr, "0.0.0.0") {
		_, port, _ := net.SplitHostPort(addr)
		return "127.0.0.1:" + port
	}
	return addr
}

func serveTLS(s *http.Server, ln net.Listener) error {
	if err := s.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func serve(s *http.Server, ln net.Listener) error {
	if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// DemoCases says which refusals the demo emulator plays, for make run.
const DemoCases = "The emulator refuses Tag_Profile_Custom_Nope (not configured: 40009) and Tag_Profile_Custom_Secret (unreadable: 40007)\n" +
	"  and calls naming reject.me (40001); account nostd has no standard data (40807), nocustom no custom data (40809)."

// CurlExample returns a ready-to-paste curl line for a lookup through the
// proxy, signed with the proxy's own key. Only for demo use: it prints a
// valid admin UserSig.
func (p *Proxy) CurlExample() string {
	host := loopback(p.Addr())
	sig := usersig.Sign(p.cfg.SecretKey, p.cfg.SDKAppID, p.cfg.AdminIdentifier, time.Now(), 24*time.Hour)
	return fmt.Sprintf(`curl -s -X POST 'http://%s%s?sdkappid=%d&identifier=%s&usersig=%s&random=1&contenttype=json' -d '{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Level"]}'`,
		host, im.PathGet, p.cfg.SDKAppID, p.cfg.AdminIdentifier, sig)
}
