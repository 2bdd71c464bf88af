package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// defaultDemoLatency is the demo emulator's added latency (-demo-latency,
// and when it is zero).
const defaultDemoLatency = 20 * time.Millisecond

// demoCases says which refusals the demo emulator plays, for make run.
const demoCases = "The emulator refuses Tag_Profile_Custom_Nope (not configured: 40009) and Tag_Profile_Custom_Secret (unreadable: 40007)\n" +
	"  and calls naming reject.me (40001); account nostd has no standard data (40807), nocustom no custom data (40809)."

// demo is the built-in IM emulator serving on a loopback port as the
// proxy's upstream (-demo, what make run uses).
type demo struct {
	sim *imsim.Server
	srv *http.Server
}

// newDemo starts the emulator and points cfg at it: its URL, SDKAppID,
// admin identifier and key, and a callback token of the run (unless one is
// set), so its change callbacks are applied as signed ones.
func newDemo(cfg *proxy.Config, latency time.Duration) (*demo, error) {
	if latency == 0 {
		latency = defaultDemoLatency
	}
	sim := imsim.New(imsim.Config{Behaviour: imsim.Behaviour{Quota: int(cfg.Rate),
		CustomTags:     append(slices.Clone(imsim.DefaultCustomTags), "Tag_Profile_Custom_Secret"),
		UnreadableTags: []string{"Tag_Profile_Custom_Secret"},
		NoStandardData: []string{"nostd"}, NoCustomData: []string{"nocustom"}, RejectAccounts: []string{"reject.me"},
	}, Faults: imsim.Faults{Latency: latency}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo emulator: %w", err)
	}
	d := &demo{sim: sim, srv: &http.Server{Handler: sim, ReadHeaderTimeout: 5 * time.Second}}
	go d.srv.Serve(ln)
	cfg.Upstream = "http://" + ln.Addr().String()
	cfg.SDKAppID, cfg.AdminIdentifier, cfg.SecretKey = sim.SDKAppID(), sim.Identifier(), sim.Key()
	if cfg.CallbackToken == "" {
		cfg.CallbackToken = strconv.FormatUint(rand.Uint64(), 36) + strconv.FormatUint(rand.Uint64(), 36)
	}
	return d, nil
}

// connect has the emulator tell p of every change, as IM would, when p
// receives change callbacks.
func (d *demo) connect(p *proxy.Proxy, token string) {
	if u := p.CallbackURL(); u != "" {
		d.sim.SetCallback(imsim.Callback{URL: u, Token: token})
	}
}

// close stops the emulator once the proxy no longer calls it.
func (d *demo) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d.srv.Shutdown(ctx)
	d.sim.Close()
}
