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
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/portrait-proxy/portrait-proxy/badtags"
	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/cache/redistier"
	"github.com/portrait-proxy/portrait-proxy/front"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Config is the whole proxy's configuration; cmd/proxy fills it from flags.
// A zero value takes the default of the part it configures, documented
// there (the field says where); the proxy's own are the Default constants.
type Config struct {
	Listen      string // API address; default DefaultListen
	AdminListen string // admin address; default DefaultAdminListen; "-" disables
	// Pprof serves the profiling endpoints under /debug/pprof/ on the
	// admin listener (never /debug/pprof/cmdline: the command line may
	// hold secrets). Off by default: profiles reveal the process's memory.
	Pprof bool

	Upstream        string        // IM REST API base URL; required
	SDKAppID        uint64        // required
	AdminIdentifier string        // default im.DefaultAdministrator
	SecretKey       string        // required
	UpstreamTimeout time.Duration // one upstream call; default upstream.DefaultTimeout

	Rate float64 // upstream calls per second; default DefaultRate
	// RateFallbackShare is the part of Rate one replica uses while the
	// shared limiter in Redis is unreachable; default
	// limiter.DefaultFallbackShare.
	RateFallbackShare float64
	RateGuard         time.Duration // jitter allowance; default limiter.DefaultGuard
	BatchMax          int           // accounts per call; default batcher.DefaultMaxAccounts
	BatchWindow       time.Duration // see batcher.Config.Window; default batcher.DefaultWindow
	FillHold          time.Duration // see batcher.Config.FillHold; default batcher.DefaultFillHold, negative: off
	DefaultTags       []string

	TTL           time.Duration // default cache.DefaultTTL
	StaleTTL      time.Duration // default cache.DefaultStaleTTL
	NegativeTTL   time.Duration // default cache.DefaultNegativeTTL
	LocalAccounts int           // in-process tier size in accounts; default cache.DefaultLocalAccounts
	Redis         string        // shared tier: see redistier.NewClient; empty: none
	// RedisPassword replaces the password of the Redis URL (AUTH/ACL);
	// RedisCA is a PEM file of roots for rediss:// (default: the system's).
	RedisPassword string
	RedisCA       string
	// CrossReplica coalesces misses across replicas: with Redis, an
	// account missed on several replicas at once is fetched by one of them,
	// at the cost of a claim round trip per miss.
	CrossReplica bool
	Auth         string // httpapi.AuthUserSig (the default) or httpapi.AuthNone
	// AuthNoneWrites lets portrait_set through when Auth is "none" (no
	// caller authenticated); without it such a proxy only reads.
	AuthNoneWrites bool
	MaxAccounts    int           // accounts in one request at most; default httpapi.DefaultMaxAccounts
	MaxQueue       int           // accounts waiting for the quota at most; default batcher.DefaultMaxQueue
	RequestTimeout time.Duration // default httpapi.DefaultRequestTimeout
	ShutdownDelay  time.Duration // readiness fails this long before the listener closes
	// DrainTimeout bounds the answers in flight at shutdown; default
	// DefaultDrainTimeout (the batcher's flush: batcher.DefaultDrainTimeout).
	DrainTimeout time.Duration

	// SetRate is portrait_set's own quota in calls per second; default
	// DefaultSetRate.
	SetRate float64
	// CallbackPath is where the upstream's change callbacks are received on
	// the API listener; default DefaultCallbackPath; "-" disables the
	// receiver.
	CallbackPath string
	// CallbackToken, when set, is the callback authentication token: a
	// callback must carry Sign = hex(SHA-256(token + RequestTime)).
	// Without it the receiver is not mounted unless CallbackUnsigned says
	// so; unsigned callbacks then only drop tags already cached, at most
	// CallbackUnsignedRate a second (default
	// httpapi.DefaultCallbackUnsignedRate).
	CallbackToken        string
	CallbackUnsigned     bool
	CallbackUnsignedRate float64
	// ClockSkew is how far the upstream's and the replicas' clocks may be
	// apart, for ordering cached values against changes; it is passed as it
	// is to each part that uses it (cache, Redis tier, badtags, httpapi),
	// whose zero value is cache.DefaultClockSkew.
	ClockSkew time.Duration

	// CustomTags, when not nil, are the custom tags the app configured: a
	// request for any other custom tag is answered 40009 without a call.
	// Nil: tags the upstream refuses are learned (see badtags).
	CustomTags []string
	// BadTagTTL is how long a tag the upstream refused is refused without a
	// call; default badtags.DefaultTTL.
	BadTagTTL time.Duration
	// DisableForward answers every other /v4 API 60002 (HTTP 404) instead
	// of forwarding it to the upstream with the caller's own credentials
	// (-forward=false). ForwardMaxBody caps a forwarded request body;
	// default httpapi.DefaultForwardMaxBody.
	DisableForward bool
	ForwardMaxBody int64
	// NetHTTPOnly serves every API request with net/http (-lean-http=false)
	// instead of answering portrait_get POSTs on the lean HTTP/1.1 front
	// (package front) and handing it the rest.
	NetHTTPOnly bool
	// TLSCert and TLSKey, both set, are PEM files: the API is then served
	// over TLS (HTTP/2 and HTTP/1.1), and the files are checked every
	// TLSReloadEvery (default 10s) and loaded again when they change.
	TLSCert, TLSKey string
	TLSReloadEvery  time.Duration

	Registry *prometheus.Registry // nil: a new one with Go and process collectors
	Logger   *slog.Logger         // nil: slog.Default()
}

// Proxy is a configured, bound proxy. Create it with New; call Run once.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	reg     *prometheus.Registry
	m       *metrics.Metrics
	batcher *batcher.Batcher
	cache   *cache.Cache
	redis   *redistier.Tier
	badTags *badtags.Set
	rclient redis.UniversalClient
	api     *http.Server
	front   *front.Server // nil with NetHTTPOnly
	admin   *http.Server
	apiLn   net.Listener
	adminLn net.Listener
	signer  *usersig.Signer
	ready   atomic.Bool
	failLog failureLog
	certs   *certReloader // nil without TLS
	// callbackPath is where change callbacks are received; "" when off.
	callbackPath string
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

func (p *Proxy) closeListeners() {
	for _, ln := range []net.Listener{p.apiLn, p.adminLn} {
		if ln != nil {
			ln.Close()
		}
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

// CallbackURL is the URL a local client reaches the change callback
// receiver at (a wildcard listen address made loopback), or "" when the
// receiver is off. The demo points its emulator's callbacks here.
func (p *Proxy) CallbackURL() string {
	if p.callbackPath == "" {
		return ""
	}
	scheme := "http"
	if p.certs != nil {
		scheme = "https"
	}
	return scheme + "://" + loopback(p.Addr()) + p.callbackPath
}

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
	}
	g.Go(p.serveAPI)
	if p.admin != nil {
		g.Go(func() error { return serve(p.admin, p.adminLn) })
	}
	p.ready.Store(true)
	p.log.Info("proxy serving", "api", p.Addr(), "admin", p.AdminAddr(), "upstream", p.cfg.Upstream,
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
		drain = DefaultDrainTimeout
	}
	sctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	err := p.shutdownAPI(sctx) // in-flight lookups finish: the batcher still runs
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

// serveAPI serves the API listener: through the front, or net/http
// alone.
func (p *Proxy) serveAPI() error {
	var err error
	switch {
	case p.front != nil && p.certs != nil:
		err = p.front.ServeTLS(p.apiLn)
	case p.front != nil:
		err = p.front.Serve(p.apiLn)
	case p.certs != nil:
		err = p.api.ServeTLS(p.apiLn, "", "")
	default:
		err = p.api.Serve(p.apiLn)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (p *Proxy) shutdownAPI(ctx context.Context) error {
	if p.front != nil {
		return p.front.Shutdown(ctx)
	}
	return p.api.Shutdown(ctx)
}

func serve(s *http.Server, ln net.Listener) error {
	if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// CurlExample returns a ready-to-paste curl line for a lookup through the
// proxy, signed with the proxy's own key. Only for demo use: it prints a
// valid admin UserSig.
func (p *Proxy) CurlExample() string {
	host := loopback(p.Addr())
	sig := usersig.Sign(p.cfg.SecretKey, p.cfg.SDKAppID, p.cfg.AdminIdentifier, time.Now(), 24*time.Hour)
	return fmt.Sprintf(`curl -s -X POST 'http://%s%s?sdkappid=%d&identifier=%s&usersig=%s&random=1&contenttype=json' -d '{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Level"]}'`,
		host, im.PathGet, p.cfg.SDKAppID, p.cfg.AdminIdentifier, sig)
}
