// Command proxy serves the IM REST API's v4/profile/portrait_get as a
// drop-in: app servers change only the host. See README.md and
// docs/interface.md for the flags; every flag also reads the environment
// variable PROXY_<NAME> (upper case, dashes as underscores), and the secret
// key also TIM_SECRET_KEY.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

func main() {
	if err := runUntilSignal(os.Args[1:], os.Getenv, os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "proxy:", err)
		os.Exit(1)
	}
}

// runUntilSignal runs the proxy until SIGINT or SIGTERM, then shuts it
// down in order (readiness first, in-flight lookups answered).
func runUntilSignal(args []string, getenv func(string) string, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, args, getenv, stdout)
}

// run parses args (with getenv as the fallback for each flag), starts the
// proxy and serves until ctx ends.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	cfg, logLevel, logFormat, err := parse(args, getenv, stdout)
	if err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(logLevel)); err != nil {
		return fmt.Errorf("-log-level: %w", err)
	}
	var h slog.Handler
	switch logFormat {
	case "json":
		h = slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})
	case "text":
		h = slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})
	default:
		return fmt.Errorf("-log-format %q: want json or text", logFormat)
	}
	cfg.Logger = slog.New(h)
	// go-redis logs dial failures on its own; send them through slog at
	// debug level (redis_up and redis_errors_total already tell of them).
	redis.SetLogger(redisLogger{cfg.Logger})
	p, err := proxy.New(cfg)
	if err != nil {
		return err
	}
	scheme := "http"
	if cfg.TLSCert != "" {
		scheme = "https"
	}
	fmt.Fprintf(stdout, "portrait proxy on %s://%s (admin http://%s)\n", scheme, p.Addr(), p.AdminAddr())
	if cfg.Demo {
		fmt.Fprintf(stdout, "demo mode: the built-in IM emulator is the upstream (accounts user0…user999999). Try:\n\n  %s\n\n  %s\n\n", p.CurlExample(), proxy.DemoCases)
	}
	return p.Run(ctx)
}

type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, "redis client: "+fmt.Sprintf(format, v...))
}

func parse(args []string, getenv func(string) string, out io.Writer) (cfg proxy.Config, logLevel, logFormat string, err error) {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.Listen, "listen", ":8080", "address of the drop-in API")
	fs.StringVar(&cfg.AdminListen, "admin-listen", ":9090", "address of /metrics, /healthz, /readyz (and /debug/pprof/ with -pprof); bind it to the pod's own address, not a Service (\"-\" disables)")
	fs.BoolVar(&cfg.Pprof, "pprof", false, "serve the profiling endpoints /debug/pprof/ on the admin listener (never /debug/pprof/cmdline)")
	fs.StringVar(&cfg.Upstream, "upstream", "https://console.tim.qq.com", "IM REST API base URL (region host)")
	fs.Uint64Var(&cfg.SDKAppID, "sdkappid", 0, "the app's SDKAppID (required unless -demo)")
	fs.StringVar(&cfg.AdminIdentifier, "admin-identifier", im.DefaultAdministrator, "admin account used for upstream calls and expected from callers")
	fs.StringVar(&cfg.SecretKey, "secret-key", "", "the app's secret key; prefer env PROXY_SECRET_KEY or TIM_SECRET_KEY")
	fs.StringVar(&cfg.Redis, "redis", "", "Redis for the shared tier: redis[s]://[user[:password]@]host:port/db for one server, redis[s]://[user[:password]@]host:port,host:port,… or host:port,host:port,… for Redis Cluster; empty: in-process tier only")
	fs.StringVar(&cfg.RedisPassword, "redis-password", "", "Redis AUTH password (replaces the URL's; the user is the URL's or \"default\"); prefer env PROXY_REDIS_PASSWORD")
	fs.StringVar(&cfg.RedisCA, "redis-ca", "", "PEM file of the roots that verify Redis's TLS certificates (rediss://); empty: the system's roots")
	fs.BoolVar(&cfg.CrossReplica, "cross-replica", false, "with -redis: coalesce misses across replicas (one replica fetches an account missed on several at once; costs a Redis round trip per miss)")
	fs.Float64Var(&cfg.Rate, "rate", 100, "upstream calls per second for the whole app (shared by every replica on the same Redis)")
	fs.Float64Var(&cfg.RateFallbackShare, "rate-fallback-share", 0.3, "part of -rate one replica uses while the shared limiter in Redis is unreachable (≤ 1/replicas keeps the quota)")
	fs.DurationVar(&cfg.RateGuard, "rate-guard", 2*time.Millisecond, "widens the limiter's one-second window (clock granularity)")
	fs.IntVar(&cfg.BatchMax, "batch-max", 100, "accounts per upstream call (1-100)")
	fs.DurationVar(&cfg.BatchWindow, "batch-window", 2*time.Millisecond, "longest a lookup waits for company when tokens are plentiful")
	fs.DurationVar(&cfg.FillHold, "fill-hold", 40*time.Millisecond, "while the quota is the limit, how long a batch that would fill within this holds off for a grant so calls leave full (negative: off)")
	defaultTags := fs.String("default-tags", "", "comma-separated tags fetched with every call (besides those asked for)")
	fs.DurationVar(&cfg.TTL, "ttl", 60*time.Second, "how long a cached tag is fresh")
	fs.DurationVar(&cfg.StaleTTL, "stale-ttl", time.Hour, "how long past fresh a value may be served while refreshing or when the upstream fails")
	fs.DurationVar(&cfg.NegativeTTL, "negative-ttl", 30*time.Second, "how long \"no such account\" is remembered")
	fs.IntVar(&cfg.LocalAccounts, "local-accounts", 1_000_000, "accounts held by the in-process tier (-1: no in-process tier, for measuring Redis alone)")
	fs.StringVar(&cfg.Auth, "auth", "usersig", "usersig: callers present a valid admin UserSig for this app; none: trusted network (reads only, unless -auth-none-writes)")
	fs.BoolVar(&cfg.AuthNoneWrites, "auth-none-writes", false, "with -auth none: let portrait_set through too (anyone who reaches the API can then change profiles)")
	fs.IntVar(&cfg.MaxAccounts, "max-accounts", 1000, "most accounts in one request")
	fs.IntVar(&cfg.MaxQueue, "max-queue", 50_000, "most accounts waiting for the upstream quota; beyond, lookups are refused at once (60007)")
	fs.DurationVar(&cfg.RequestTimeout, "request-timeout", 5*time.Second, "longest a request waits for its answer")
	fs.DurationVar(&cfg.UpstreamTimeout, "upstream-timeout", 5*time.Second, "timeout of one upstream call (the upstream's own is 3s)")
	fs.DurationVar(&cfg.ShutdownDelay, "shutdown-delay", 0, "on SIGTERM, how long /readyz fails before the listener closes")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", 10*time.Second, "on SIGTERM, how long in-flight lookups may take")
	fs.Float64Var(&cfg.SetRate, "set-rate", 200, "portrait_set calls per second through the proxy (its own quota, shared like -rate)")
	fs.StringVar(&cfg.CallbackPath, "callback-path", "/im/callback", "path on the API listener receiving the upstream's Profile.CallbackPortraitSet (\"-\" disables)")
	fs.StringVar(&cfg.CallbackToken, "callback-token", "", "callback authentication token: callbacks must carry Sign = hex(SHA-256(token+RequestTime)) and their values are applied (without it the receiver is off unless -callback-unsigned); prefer env PROXY_CALLBACK_TOKEN")
	fs.BoolVar(&cfg.CallbackUnsigned, "callback-unsigned", false, "without -callback-token, receive callbacks anyway: unauthenticated, they only drop tags already cached (rate-bounded by -callback-unsigned-rate)")
	fs.Float64Var(&cfg.CallbackUnsignedRate, "callback-unsigned-rate", 100, "unsigned callbacks accepted per second per replica (more are answered HTTP 429)")
	fs.DurationVar(&cfg.ClockSkew, "clock-skew", time.Second, "how far the upstream's and the replicas' clocks may be apart (orders cached values against changes)")
	customTags := fs.String("custom-tags", "", "comma list of the custom tags the app configured: any other custom tag is answered 40009 without a call (empty: learn the tags the upstream refuses)")
	fs.DurationVar(&cfg.BadTagTTL, "bad-tag-ttl", 10*time.Minute, "how long a tag the upstream refused (40009, 40007, 40801) is answered at once without a call")
	forward := fs.Bool("forward", true, "forward every other /v4/... API to the upstream unchanged, with the caller's own identifier and UserSig (false: answer them 60002)")
	fs.Int64Var(&cfg.ForwardMaxBody, "forward-max-body", 1<<20, "largest forwarded request body in bytes (larger: 40001, not sent)")
	fs.StringVar(&cfg.TLSCert, "tls-cert", "", "PEM certificate (chain) file: serve the API over TLS (HTTP/2 and HTTP/1.1); reloaded when it changes")
	fs.StringVar(&cfg.TLSKey, "tls-key", "", "PEM private key file for -tls-cert")
	fs.BoolVar(&cfg.Demo, "demo", false, "run the built-in IM emulator as the upstream (what make run uses)")
	fs.DurationVar(&cfg.DemoLatency, "demo-latency", 20*time.Millisecond, "the demo emulator's added latency")
	fs.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&logFormat, "log-format", "json", "json or text")
	if err = fs.Parse(args); err != nil {
		return cfg, "", "", err
	}
	if fs.NArg() > 0 {
		return cfg, "", "", fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	// Environment fills every flag not given on the command line.
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		env := "PROXY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v := getenv(env)
		if v == "" && f.Name == "secret-key" {
			v = getenv("TIM_SECRET_KEY")
		}
		if v != "" {
			if err := fs.Set(f.Name, v); err != nil && envErr == nil {
				envErr = fmt.Errorf("%s: %w", env, err)
			}
		}
	})
	if envErr != nil {
		return cfg, "", "", envErr
	}
	cfg.DisableForward = !*forward
	if *defaultTags != "" {
		cfg.DefaultTags = strings.Split(*defaultTags, ",")
	}
	for _, t := range strings.Split(*customTags, ",") { // only separators: none given (learn), not "no custom tag"
		if t = strings.TrimSpace(t); t != "" {
			cfg.CustomTags = append(cfg.CustomTags, t)
		}
	}
	return cfg, logLevel, logFormat, nil
}
