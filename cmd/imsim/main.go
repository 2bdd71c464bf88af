// Command imsim runs the IM REST API emulator (package imsim) as a server.
//
//	imsim -listen 127.0.0.1:8081 -quota 100 -latency 20ms
//
// GET /imsim/stats reports what it saw; POST /imsim/config changes
// behaviour, faults and callbacks while it runs; POST /imsim/reset clears
// the stats; POST /imsim/client_set changes a profile as a client SDK
// would (the change callback follows).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "imsim:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("imsim", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:8081", "address to serve on")
	var cfg imsim.Config
	fs.Uint64Var(&cfg.SDKAppID, "sdkappid", imsim.DefaultSDKAppID, "SDKAppID of the emulated app")
	fs.StringVar(&cfg.Identifier, "identifier", im.DefaultAdministrator, "admin account")
	fs.IntVar(&cfg.Accounts, "accounts", imsim.DefaultAccounts, "seeded accounts user0…user<N-1>")
	fs.IntVar(&cfg.Behaviour.Quota, "quota", imsim.DefaultQuota, "portrait_get calls accepted in any sliding second (negative: unlimited)")
	fs.IntVar(&cfg.Behaviour.ThrottleCode, "throttle-code", imsim.DefaultThrottleCode, "error code answering calls over the quota")
	fs.BoolVar(&cfg.Behaviour.MissingFailsCall, "missing-fails-call", false, "a non-existent account fails the whole call with 40003")
	fs.BoolVar(&cfg.Behaviour.UnsetAsEmpty, "unset-as-empty", false, "return unset tags with empty values instead of omitting them")
	fs.DurationVar(&cfg.Faults.Latency, "latency", 0, "added latency per call")
	fs.DurationVar(&cfg.Faults.Jitter, "jitter", 0, "uniform random extra latency")
	fs.Float64Var(&cfg.Faults.Fail502, "fail-502", 0, "fraction of calls answered HTTP 502")
	fs.Float64Var(&cfg.Faults.Timeout, "timeout", 0, "fraction of calls never answered")
	fs.Float64Var(&cfg.Faults.ItemInternal, "item-internal", 0, "fraction of accounts failing with 40006")
	fs.IntVar(&cfg.Behaviour.SetQuota, "set-quota", imsim.DefaultSetQuota, "portrait_set calls accepted in any sliding second")
	fs.IntVar(&cfg.Behaviour.APIQuota, "api-quota", imsim.DefaultAPIQuota, "calls accepted in any sliding second by each other API (account_import, sendmsg, …; negative: unlimited)")
	fs.Float64Var(&cfg.Faults.Drop, "drop", 0, "fraction of calls to other APIs whose connection is closed after the request was read, without an answer")
	fs.StringVar(&cfg.Callback.URL, "callback-url", "", "where to POST Profile.CallbackPortraitSet after each change (empty: no callbacks); token from env IMSIM_CALLBACK_TOKEN")
	fs.DurationVar(&cfg.Callback.Jitter, "callback-jitter", 0, "uniform random delay of each callback (deliveries overtake each other)")
	fs.Float64Var(&cfg.Callback.Duplicate, "callback-duplicate", 0, "fraction of callbacks delivered twice")
	customTags := fs.String("custom-tags", strings.Join(imsim.DefaultCustomTags, ","), "custom tags configured in the app (others are refused whole with 40009)")
	unreadable := fs.String("unreadable-tags", "", "comma list of configured tags the admin may not read (refused whole with 40007)")
	noStd := fs.String("no-standard-data", "", "comma list of accounts holding no standard profile data (item 40807)")
	noCustom := fs.String("no-custom-data", "", "comma list of accounts holding no custom profile data (item 40809)")
	reject := fs.String("reject-accounts", "", "comma list of account ids whose call is refused whole with -reject-code")
	fs.IntVar(&cfg.Behaviour.RejectCode, "reject-code", imsim.DefaultRejectCode, "code refusing a call that names a -reject-accounts id")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg.Behaviour.CustomTags = list(*customTags)
	if cfg.Behaviour.CustomTags == nil {
		cfg.Behaviour.CustomTags = []string{} // none configured
	}
	cfg.Behaviour.UnreadableTags = list(*unreadable)
	cfg.Behaviour.NoStandardData = list(*noStd)
	cfg.Behaviour.NoCustomData = list(*noCustom)
	cfg.Behaviour.RejectAccounts = list(*reject)
	cfg.Key = os.Getenv("IMSIM_SECRET_KEY")
	cfg.Callback.Token = os.Getenv("IMSIM_CALLBACK_TOKEN")
	sim := imsim.New(cfg)
	defer sim.Close()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: sim, ReadHeaderTimeout: 5 * time.Second}
	slog.Info("imsim serving", "addr", ln.Addr().String(), "sdkappid", sim.SDKAppID(), "identifier", sim.Identifier())
	fmt.Fprintf(stdout, "imsim listening on http://%s\n", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// list splits a comma list, dropping empty entries; nil when none.
func list(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
