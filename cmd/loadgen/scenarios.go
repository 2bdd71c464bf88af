package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// maxConns bounds the open-loop generator's connections, as an app
// server's connection pool would: past saturation, lookups that find every
// connection busy are counted "not sent" instead of opening thousands more
// connections, whose cost on two shared cores would be measured as the
// proxy's.
const maxConns = 4_000

// coldSteps offers cold lookups (every account new) at each rate of
// o.steps in turn, against one proxy, with a pause between steps so one
// step's queue does not spill into the next.
func coldSteps(o options, out io.Writer) error {
	e, err := startEnv(o)
	if err != nil {
		return err
	}
	defer e.stop()
	var next atomic.Int64
	next.Store(100_000)
	fmt.Fprintf(out, "cold, offered load stepped: open loop, every lookup a new account, %v per step (1 proxy)\n", o.stepDuration)
	fmt.Fprintf(out, "  %9s %9s %6s %5s %5s %6s %6s %6s %9s %9s %9s %9s %5s %6s\n", "offered/s", "answer/s", "acc/cl", "max/s", "thrtl",
		"shed", "errors", "wrong", "p50", "p90", "p99", "max", "CPU", "RSS")
	for _, rate := range o.steps {
		if err := simReset(e.simURL); err != nil {
			return err
		}
		cpu0 := e.p.cpu()
		s := openLoop(e.urls, rate, o.stepDuration, maxConns, 0, func(int64) string { return imsim.AccountName(int(next.Add(1))) })
		st, err := simStats(context.Background(), e.simURL)
		if err != nil {
			return err
		}
		s.accountsPerCall, s.maxCallsPerSec, s.throttled = st.AccountsPerCall(), st.MaxCallsPerSec, st.Throttled
		s.cpu = (e.p.cpu() - cpu0).Seconds() / s.elapsed.Seconds()
		s.rssMiB = e.p.rssBytes() >> 20
		rep.coldSteps = append(rep.coldSteps, s)
		fmt.Fprintf(out, "  %9.0f %9.0f %6.2f %5d %5d %6d %6d %6d %9v %9v %9v %9v %4.0f%% %4dMi\n", s.offered, s.rate(), s.accountsPerCall,
			s.maxCallsPerSec, s.throttled, s.shed, s.errors+s.unsent, s.wrong, pct(s.lat, .5).Round(100*time.Microsecond),
			pct(s.lat, .9).Round(100*time.Microsecond), pct(s.lat, .99).Round(100*time.Microsecond), pct(s.lat, 1).Round(100*time.Microsecond), 100*s.cpu, s.rssMiB)
		if s.firstErr != "" {
			fmt.Fprintf(out, "  first error: %s\n", s.firstErr)
		}
		drain(e.admin, 15*time.Second) // no step starts with the last one's queue
	}
	fmt.Fprintln(out)
	return nil
}

// drain waits (up to limit) until the proxy has no account queued, then a
// second more.
func drain(admin string, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		m, err := scrape(admin)
		if err == nil && m["portrait_proxy_queue_accounts"] == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second)
}

// fresh measures how long replicas serve a value older than a change:
// three proxies on one Redis, each holding the account in its in-process
// tier; a portrait_set through A (until B and C serve the new value), and
// a client's change announced by the emulator's callback to C (until A, B
// and C serve it).
func fresh(o options, out io.Writer) error {
	f, err := freshRun(o)
	if err != nil {
		return err
	}
	rep.fresh = f
	printFresh(out, "fresh after writes: 3 replicas on one Redis, each holding the account", f)
	if rep.base.ok() {
		// The previous build in the same run: a tail of a few hundred changes moves
		// with the machine more than with the code.
		po := o
		po.proxyBin = rep.base.proxy
		pf, err := freshRun(po)
		if err != nil {
			rep.base.note("fresh: the previous build did not run: %v", err)
			return nil
		}
		rep.freshPrev = pf
		printFresh(out, "  the same for "+rep.base.name(), pf)
	}
	return nil
}

// freshRun measures how long replicas serve the old value after a change.
func freshRun(o options) (*freshResult, error) {
	const token = "loadgen-callback-token"
	e, err := startReplicas(o, 3, "-callback-token", token)
	if err != nil {
		return nil, err
	}
	defer e.stop()
	cfg, _ := json.Marshal(map[string]any{"callback": map[string]string{"url": "http://" + e.ps[2].addrs[0] + "/im/callback", "token": token}})
	resp, err := http.Post(e.simURL+"/imsim/config", "application/json", bytes.NewReader(cfg))
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	const n = 500 // changes of each kind: enough that a p99 is not the max
	const base = 800_000
	conns := make([]*rawConn, 3)
	for i := range conns {
		if conns[i], err = newRawConn(e.urls[i]); err != nil {
			return nil, err
		}
		defer conns[i].close()
	}
	for k := range 2 * n { // every replica holds every account
		for _, c := range conns {
			if ok, _, err := lookup(c, imsim.AccountName(base+k)); err != nil || !ok {
				return nil, fmt.Errorf("warm-up lookup: %v", err)
			}
		}
	}
	if err := simReset(e.simURL); err != nil {
		return nil, err
	}
	serves := func(c *rawConn, account, value string) (bool, error) {
		got, err := c.post(`{"To_Account":["` + account + `"],"TagList":["Tag_Profile_IM_Nick"]}`)
		if err != nil {
			return false, err
		}
		return bytes.Contains(got, []byte(`"`+value+`"`)), nil
	}
	waitAll := func(cs []*rawConn, account, value string, from time.Time) (time.Duration, error) {
		for _, c := range cs {
			for {
				ok, err := serves(c, account, value)
				if err != nil {
					return 0, err
				}
				if ok {
					break
				}
				if time.Since(from) > 10*time.Second {
					return 0, fmt.Errorf("%s never served %q", account, value)
				}
			}
		}
		return time.Since(from), nil
	}
	setConn, err := newRawConn("http://" + e.ps[0].addrs[0] + im.PathSet + signedQuery())
	if err != nil {
		return nil, err
	}
	defer setConn.close()
	f := &freshResult{sets: n, callbacks: n}
	for k := range n {
		acc, val := imsim.AccountName(base+k), fmt.Sprintf("set-%d", k)
		body, _ := json.Marshal(im.SetRequest{FromAccount: acc, ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"` + val + `"`)}}})
		got, err := setConn.post(string(body))
		if err != nil || !bytes.Contains(got, []byte(`"ErrorCode":0`)) {
			return nil, fmt.Errorf("portrait_set through A: %v %s", err, got)
		}
		d, err := waitAll(conns[1:], acc, val, time.Now())
		if err != nil {
			return nil, err
		}
		f.setLat = append(f.setLat, d)
		time.Sleep(5 * time.Millisecond) // under the set quota
	}
	for k := range n {
		acc, val := imsim.AccountName(base+n+k), fmt.Sprintf("client-%d", k)
		body, _ := json.Marshal(im.SetRequest{FromAccount: acc, ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"` + val + `"`)}}})
		t0 := time.Now()
		resp, err := http.Post(e.simURL+"/imsim/client_set", "application/json", bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		resp.Body.Close()
		d, err := waitAll(conns, acc, val, t0)
		if err != nil {
			return nil, err
		}
		f.cbLat = append(f.cbLat, d)
	}
	slices.Sort(f.setLat)
	slices.Sort(f.cbLat)
	// The emulator counts a callback once C has answered it, after C
	// applied it: the last change can be served before it is counted.
	var st imsim.Stats
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if st, err = simStats(context.Background(), e.simURL); err != nil {
			return nil, err
		}
		if st.CallbacksSent+st.CallbackErrors >= 2*n || time.Now().After(deadline) {
			break
		}
	}
	f.fetchesPer = int(st.Accounts)
	if m, err := scrape(e.admins[1]); err == nil {
		f.feedMean = histMean(map[string]float64{}, m, "portrait_proxy_change_feed_delay_seconds")
	}
	if st.CallbackErrors != 0 || st.CallbacksSent != 2*n { // one per set through A, one per client change
		return nil, fmt.Errorf("callbacks: %d sent, %d failed, want %d sent", st.CallbacksSent, st.CallbackErrors, 2*n)
	}
	f.callbacksSent = st.CallbacksSent
	return f, nil
}

func printFresh(out io.Writer, title string, f *freshResult) {
	fmt.Fprintf(out, "%s\n", title)
	fmt.Fprintf(out, "  portrait_set through A until B and C serve it (%d): p50 %v  p99 %v  max %v\n", f.sets,
		pct(f.setLat, .5).Round(10*time.Microsecond), pct(f.setLat, .99).Round(10*time.Microsecond), pct(f.setLat, 1).Round(10*time.Microsecond))
	fmt.Fprintf(out, "  client change, callback to C, until A, B, C serve it (%d): p50 %v  p99 %v  max %v\n", f.callbacks,
		pct(f.cbLat, .5).Round(10*time.Microsecond), pct(f.cbLat, .99).Round(10*time.Microsecond), pct(f.cbLat, 1).Round(10*time.Microsecond))
	fmt.Fprintf(out, "  feed delay mean %.2fms; upstream fetches after warm-up %d; callbacks sent %d\n\n",
		f.feedMean*1000, f.fetchesPer, f.callbacksSent)
}
