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

// options are the command line: the proxy's Config and what only the
// command uses.
type options struct {
	proxy.Config
	logLevel, logFormat string
	// demo runs the built-in emulator as the upstream, with demoLatency
	// added to its answers.
	demo        bool
	demoLatency time.Duration
}

// run parses args (with getenv as the fallback for each flag), starts the
// proxy and serves until ctx ends.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	o, err := parse(args, getenv, stdout)
	if err != nil {
		return err
	}
	if o.Logger, err = newLogger(o.logLevel, o.logFormat); err != nil {
		return err
	}
	// go-redis logs dial failures on its own; send them through slog at
	// debug level (redis_up and redis_errors_total already tell of them).
	redis.SetLogger(redisLogger{o.Logger})
	var d *demo
	if o.demo {
		if d, err = newDemo(&o.Config, o.demoLatency); err != nil {
			return err
		}
		defer d.close() // after Run: the batcher's last calls reach it
	}
	p, err := proxy.New(o.Config)
	if err != nil {
		return err
	}
	scheme := "http"
	if o.TLSCert != "" {
		scheme = "https"
	}
	fmt.Fprintf(stdout, "portrait proxy on %s://%s (admin http://%s)\n", scheme, p.Addr(), p.AdminAddr())
	if d != nil {
		d.connect(p, o.CallbackToken)
		fmt.Fprintf(stdout, "demo mode: the built-in IM emulator is the upstream (accounts user0…user999999). Try:\n\n  %s\n\n  %s\n\n", p.CurlExample(), demoCases)
	}
	return p.Run(ctx)
}

// newLogger is the process's logger: level and format as -log-level and
// -log-format say, to stderr.
func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("-log-format %q: want json or text", format)
}

type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, "redis client: "+fmt.Sprintf(format, v...))
}

// parse reads the flags from args, then from the environment for each flag
// not given (PROXY_<NAME>; the secret key also TIM_SECRET_KEY).
func parse(args []string, getenv func(string) string, out io.Writer) (o options, err error) {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(out)
	serverFlags(fs, &o)
	lists := upstreamFlags(fs, &o)
	cacheFlags(fs, &o)
	if err = fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err = fromEnv(fs, getenv); err != nil {
		return o, err
	}
	lists.apply(&o.Config)
	return o, nil
}

// fromEnv sets every flag not given on the command line from the
// environment.
func fromEnv(fs *flag.FlagSet, getenv func(string) string) error {
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
	return envErr
}
