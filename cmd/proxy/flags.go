package main

import (
	"flag"
	"strings"

	"github.com/portrait-proxy/portrait-proxy/badtags"
	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// The flags' defaults are the parts' own (their zero values), shown by name.

// serverFlags are the listeners', the callers' and the process's flags.
func serverFlags(fs *flag.FlagSet, o *options) {
	fs.StringVar(&o.Listen, "listen", proxy.DefaultListen, "address of the drop-in API")
	fs.StringVar(&o.AdminListen, "admin-listen", proxy.DefaultAdminListen, "address of /metrics, /healthz, /readyz (and /debug/pprof/ with -pprof); bind it to the pod's own address, not a Service (\"-\" disables)")
	fs.BoolVar(&o.Pprof, "pprof", false, "serve the profiling endpoints /debug/pprof/ on the admin listener (never /debug/pprof/cmdline)")
	fs.StringVar(&o.Auth, "auth", httpapi.AuthUserSig, "usersig: callers present a valid admin UserSig for this app; none: trusted network (reads only, unless -auth-none-writes)")
	fs.BoolVar(&o.AuthNoneWrites, "auth-none-writes", false, "with -auth none: let portrait_set through too (anyone who reaches the API can then change profiles)")
	fs.IntVar(&o.MaxAccounts, "max-accounts", httpapi.DefaultMaxAccounts, "most accounts in one request")
	fs.DurationVar(&o.RequestTimeout, "request-timeout", httpapi.DefaultRequestTimeout, "longest a request waits for its answer")
	fs.DurationVar(&o.ShutdownDelay, "shutdown-delay", 0, "on SIGTERM, how long /readyz fails before the listener closes")
	fs.DurationVar(&o.DrainTimeout, "drain-timeout", proxy.DefaultDrainTimeout, "on SIGTERM, how long in-flight lookups may take")
	fs.Int64Var(&o.ForwardMaxBody, "forward-max-body", httpapi.DefaultForwardMaxBody, "largest forwarded request body in bytes (larger: 40001, not sent)")
	fs.StringVar(&o.TLSCert, "tls-cert", "", "PEM certificate (chain) file: serve the API over TLS (HTTP/2 and HTTP/1.1); reloaded when it changes")
	fs.StringVar(&o.TLSKey, "tls-key", "", "PEM private key file for -tls-cert")
	fs.BoolVar(&o.demo, "demo", false, "run the built-in IM emulator as the upstream (what make run uses)")
	fs.DurationVar(&o.demoLatency, "demo-latency", defaultDemoLatency, "the demo emulator's added latency")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "json or text")
}

// lists are the flags read into Config after parsing: comma lists, and
// -forward (Config says the opposite, DisableForward).
type lists struct {
	defaultTags, customTags *string
	forward, leanHTTP       *bool
}

func (l lists) apply(cfg *proxy.Config) {
	cfg.DisableForward = !*l.forward
	cfg.NetHTTPOnly = !*l.leanHTTP
	if *l.defaultTags != "" {
		cfg.DefaultTags = strings.Split(*l.defaultTags, ",")
	}
	for _, t := range strings.Split(*l.customTags, ",") { // only separators: none given (learn), not "no custom tag"
		if t = strings.TrimSpace(t); t != "" {
			cfg.CustomTags = append(cfg.CustomTags, t)
		}
	}
}

// upstreamFlags are the app's, the quota's and the batcher's flags.
func upstreamFlags(fs *flag.FlagSet, o *options) lists {
	fs.StringVar(&o.Upstream, "upstream", "https://console.tim.qq.com", "IM REST API base URL (region host)")
	fs.Uint64Var(&o.SDKAppID, "sdkappid", 0, "the app's SDKAppID (required unless -demo)")
	fs.StringVar(&o.AdminIdentifier, "admin-identifier", im.DefaultAdministrator, "admin account used for upstream calls and expected from callers")
	fs.StringVar(&o.SecretKey, "secret-key", "", "the app's secret key; prefer env PROXY_SECRET_KEY or TIM_SECRET_KEY")
	fs.DurationVar(&o.UpstreamTimeout, "upstream-timeout", upstream.DefaultTimeout, "timeout of one upstream call (the upstream's own is 3s)")
	fs.Float64Var(&o.Rate, "rate", proxy.DefaultRate, "upstream calls per second for the whole app (shared by every replica on the same Redis)")
	fs.Float64Var(&o.RateFallbackShare, "rate-fallback-share", limiter.DefaultFallbackShare, "part of -rate one replica uses while the shared limiter in Redis is unreachable (≤ 1/replicas keeps the quota)")
	fs.DurationVar(&o.RateGuard, "rate-guard", limiter.DefaultGuard, "widens the limiter's one-second window (clock granularity)")
	fs.Float64Var(&o.SetRate, "set-rate", proxy.DefaultSetRate, "portrait_set calls per second through the proxy (its own quota, shared like -rate)")
	fs.IntVar(&o.BatchMax, "batch-max", batcher.DefaultMaxAccounts, "accounts per upstream call (1-100)")
	fs.DurationVar(&o.BatchWindow, "batch-window", batcher.DefaultWindow, "longest a lookup waits for company when tokens are plentiful")
	fs.DurationVar(&o.FillHold, "fill-hold", batcher.DefaultFillHold, "while the quota is the limit, how long a batch that would fill within this holds off for a grant so calls leave full (negative: off)")
	fs.IntVar(&o.MaxQueue, "max-queue", batcher.DefaultMaxQueue, "most accounts waiting for the upstream quota; beyond, lookups are refused at once (60007)")
	fs.DurationVar(&o.BadTagTTL, "bad-tag-ttl", badtags.DefaultTTL, "how long a tag the upstream refused (40009, 40007, 40801) is answered at once without a call")
	return lists{
		defaultTags: fs.String("default-tags", "", "comma-separated tags fetched with every call (besides those asked for)"),
		customTags:  fs.String("custom-tags", "", "comma list of the custom tags the app configured: any other custom tag is answered 40009 without a call (empty: learn the tags the upstream refuses)"),
		forward:     fs.Bool("forward", true, "forward every other /v4/... API to the upstream unchanged, with the caller's own identifier and UserSig (false: answer them 60002)"),
		leanHTTP:    fs.Bool("lean-http", true, "answer portrait_get POSTs over HTTP/1.1 on the proxy's lean front, handing every other request to net/http (false: net/http serves all)"),
	}
}

// cacheFlags are the cache's, Redis's and the change callbacks' flags.
func cacheFlags(fs *flag.FlagSet, o *options) {
	fs.StringVar(&o.Redis, "redis", "", "Redis for the shared tier: redis[s]://[user[:password]@]host:port/db for one server, redis[s]://[user[:password]@]host:port,host:port,… or host:port,host:port,… for Redis Cluster; empty: in-process tier only")
	fs.StringVar(&o.RedisPassword, "redis-password", "", "Redis AUTH password (replaces the URL's; the user is the URL's or \"default\"); prefer env PROXY_REDIS_PASSWORD")
	fs.StringVar(&o.RedisCA, "redis-ca", "", "PEM file of the roots that verify Redis's TLS certificates (rediss://); empty: the system's roots")
	fs.BoolVar(&o.CrossReplica, "cross-replica", false, "with -redis: coalesce misses across replicas (one replica fetches an account missed on several at once; costs a Redis round trip per miss)")
	fs.DurationVar(&o.TTL, "ttl", cache.DefaultTTL, "how long a cached tag is fresh")
	fs.DurationVar(&o.StaleTTL, "stale-ttl", cache.DefaultStaleTTL, "how long past fresh a value may be served while refreshing or when the upstream fails")
	fs.DurationVar(&o.NegativeTTL, "negative-ttl", cache.DefaultNegativeTTL, "how long \"no such account\" is remembered")
	fs.IntVar(&o.LocalAccounts, "local-accounts", cache.DefaultLocalAccounts, "accounts held by the in-process tier (-1: no in-process tier, for measuring Redis alone)")
	fs.DurationVar(&o.ClockSkew, "clock-skew", cache.DefaultClockSkew, "how far the upstream's and the replicas' clocks may be apart (orders cached values against changes)")
	fs.StringVar(&o.CallbackPath, "callback-path", proxy.DefaultCallbackPath, "path on the API listener receiving the upstream's Profile.CallbackPortraitSet (\"-\" disables)")
	fs.StringVar(&o.CallbackToken, "callback-token", "", "callback authentication token: callbacks must carry Sign = hex(SHA-256(token+RequestTime)) and their values are applied (without it the receiver is off unless -callback-unsigned); prefer env PROXY_CALLBACK_TOKEN")
	fs.BoolVar(&o.CallbackUnsigned, "callback-unsigned", false, "without -callback-token, receive callbacks anyway: unauthenticated, they only drop tags already cached (rate-bounded by -callback-unsigned-rate)")
	fs.Float64Var(&o.CallbackUnsignedRate, "callback-unsigned-rate", httpapi.DefaultCallbackUnsignedRate, "unsigned callbacks accepted per second per replica (more are answered HTTP 429)")
}
