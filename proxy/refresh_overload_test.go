package proxy_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// TestRefreshesNeverCrowdOutMisses: past the quota, stale hits ask for
// more background refreshes than the quota serves (1,000 at once, 2 s of
// quota) while cold misses keep arriving at 60 % of the quota. The misses
// are all served in time (none shed: refreshes are not counted against
// them and are the first out of a full queue), the stale hits are answered
// at once, and the refreshes wait or are dropped (refresh_shed_total).
func TestRefreshesNeverCrowdOutMisses(t *testing.T) {
	const quota = 5 // 500 lookups/s
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota}, Faults: imsim.Faults{Latency: 5 * time.Millisecond}},
		proxy.Config{Rate: quota, RequestTimeout: time.Second, MaxQueue: 300, TTL: time.Second, StaleTTL: time.Hour})
	const nick = "Tag_Profile_IM_Nick"
	stale := accounts(0, 1000)
	for i := 0; i < len(stale); i += 100 {
		if out := r.get(t, stale[i:i+100], nick); out.ErrorCode != 0 {
			t.Fatalf("warming: %+v", out)
		}
	}
	time.Sleep(1100 * time.Millisecond) // every warmed value is past fresh now
	if out := r.get(t, stale, nick); out.ErrorCode != 0 || len(out.UserProfileItem) != len(stale) {
		t.Fatalf("stale hits: %d, %d items", out.ErrorCode, len(out.UserProfileItem))
	}

	var served, failed, wrong atomic.Int64
	var wg sync.WaitGroup
	tick := time.NewTicker(100 * time.Millisecond)
	next := 100_000
	for range 20 { // 2 s of 30 new accounts per 100 ms: 300 lookups/s
		<-tick.C
		for range 3 {
			accs := accounts(next, 10)
			next += 10
			wg.Go(func() {
				out, err := r.try(context.Background(), accs, nick)
				if err != nil || out.ErrorCode != 0 || len(out.UserProfileItem) != len(accs) {
					failed.Add(1)
					return
				}
				for i, it := range out.UserProfileItem {
					want, _ := imsim.SeededValue(accs[i], nick)
					if it.ToAccount != accs[i] || it.ResultCode != 0 || len(it.ProfileItem) != 1 || string(it.ProfileItem[0].Value) != string(want) {
						wrong.Add(1)
						return
					}
				}
				served.Add(1)
			})
		}
	}
	tick.Stop()
	wg.Wait()
	m := r.p.Metrics()
	st := r.sim.Stats()
	t.Logf("miss requests: %d served whole, %d failed, %d wrong; %v lookups shed, %v refreshes shed; %d calls, %.1f accounts per call",
		served.Load(), failed.Load(), wrong.Load(), testutil.ToFloat64(m.Shed), testutil.ToFloat64(m.RefreshShed), st.Calls, st.AccountsPerCall())
	if failed.Load() != 0 || wrong.Load() != 0 || served.Load() != 60 {
		t.Fatalf("%d of 60 miss requests failed, %d wrong", failed.Load(), wrong.Load())
	}
	if testutil.ToFloat64(m.Shed) != 0 {
		t.Fatalf("%v missed lookups shed", testutil.ToFloat64(m.Shed))
	}
	if testutil.ToFloat64(m.RefreshShed) == 0 {
		t.Fatal("no refresh was dropped with 2 s of quota's worth of refreshes queued behind misses")
	}
	if st.MaxCallsPerSec > quota || st.Throttled != 0 {
		t.Fatalf("quota broken: %+v", st)
	}
}
