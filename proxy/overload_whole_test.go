package proxy_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// TestOverloadAdmitsRequestsWhole offers requests of 10 new accounts at 3×
// what the quota serves, in bursts (requests admitted at the same moment
// must not each count on the same quota): each request is answered whole or refused whole
// (60007, at once), none in part and none timed out, and nearly every
// account fetched goes to a request answered whole (the accounts of a
// refused request never enter a batch).
func TestOverloadAdmitsRequestsWhole(t *testing.T) {
	const quota = 2 // 200 lookups/s
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota}, Faults: imsim.Faults{Latency: 5 * time.Millisecond}},
		proxy.Config{Rate: quota, RequestTimeout: time.Second, MaxQueue: 1000})
	const nick = "Tag_Profile_IM_Nick"
	var whole, refused, partial, timedOut, wrong, other atomic.Int64
	var wg sync.WaitGroup
	tick := time.NewTicker(500 * time.Millisecond)
	next := 200_000
	for range 6 { // 3 s of bursts of 30 requests of 10 accounts at once: 600 lookups/s
		<-tick.C
		for range 30 {
			accs := accounts(next, 10)
			next += 10
			wg.Go(func() {
				out, err := r.try(context.Background(), accs, nick)
				switch {
				case err != nil:
					other.Add(1)
				case out.ErrorCode == 60007 && len(out.UserProfileItem) == 0:
					refused.Add(1)
				case out.ErrorCode == 70169:
					timedOut.Add(1)
				case out.ErrorCode != 0 || len(out.UserProfileItem) != len(accs):
					other.Add(1)
				default:
					ok := 0
					for i, it := range out.UserProfileItem {
						want, _ := imsim.SeededValue(accs[i], nick)
						switch {
						case it.ToAccount != accs[i] || it.ResultCode == 0 && (len(it.ProfileItem) != 1 || string(it.ProfileItem[0].Value) != string(want)):
							wrong.Add(1)
							return
						case it.ResultCode == 70169:
							timedOut.Add(1)
						case it.ResultCode == 0:
							ok++
						}
					}
					if ok == len(accs) {
						whole.Add(1)
					} else {
						partial.Add(1)
					}
				}
			})
		}
	}
	tick.Stop()
	wg.Wait()
	st := r.sim.Stats()
	t.Logf("%d requests answered whole, %d refused whole, %d in part, %d timed out, %d wrong, %d other; upstream fetched %d accounts in %d calls (%.1f per call)",
		whole.Load(), refused.Load(), partial.Load(), timedOut.Load(), wrong.Load(), other.Load(), st.Accounts, st.Calls, st.AccountsPerCall())
	if partial.Load() != 0 || timedOut.Load() != 0 || wrong.Load() != 0 || other.Load() != 0 {
		t.Fatalf("%d requests answered in part, %d timed out, %d wrong, %d other", partial.Load(), timedOut.Load(), wrong.Load(), other.Load())
	}
	if refused.Load() == 0 || whole.Load() == 0 {
		t.Fatalf("%d answered, %d refused at 3× the quota", whole.Load(), refused.Load())
	}
	if served := 10 * whole.Load(); float64(served) < 0.95*float64(st.Accounts) {
		t.Fatalf("%d accounts answered in whole requests of %d fetched", served, st.Accounts)
	}
	if st.MaxCallsPerSec > quota || st.Throttled != 0 {
		t.Fatalf("quota broken: %+v", st)
	}
}
