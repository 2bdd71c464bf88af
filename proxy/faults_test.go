package proxy_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// TestUpstreamFaultsUnderLoad switches the emulator to 502s, to timeouts
// and to throttling while callers look up warm (cached) and cold accounts:
// no warm lookup fails, no answer is wrong, cold lookups that fail get a
// clear IM error within their deadline, and the quota holds.
func TestUpstreamFaultsUnderLoad(t *testing.T) {
	const quota = 20
	for _, tc := range []struct {
		name  string
		fault func(*imsim.Server)
		codes map[int]bool // acceptable failure codes for cold lookups
	}{
		{"502", func(s *imsim.Server) { s.SetFaults(imsim.Faults{Fail502: 1}) }, map[int]bool{40006: true}},
		{"timeouts", func(s *imsim.Server) { s.SetFaults(imsim.Faults{Timeout: 1, TimeoutAfter: 5 * time.Second}) }, map[int]bool{70169: true, 40006: true}},
		{"throttling", func(s *imsim.Server) { s.SetFaults(imsim.Faults{CallErrorCode: 60011}) }, map[int]bool{60011: true, 70169: true, 60007: true}},
		{"slow", func(s *imsim.Server) {
			s.SetFaults(imsim.Faults{Latency: 400 * time.Millisecond, Jitter: 400 * time.Millisecond})
		}, map[int]bool{70169: true, 60007: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota}})
			const timeout = 1500 * time.Millisecond
			r := startProxy(t, sim, srv.URL, proxy.Config{Rate: quota, RequestTimeout: timeout, UpstreamTimeout: 500 * time.Millisecond})
			warm := accounts(0, 300)
			for i := 0; i < len(warm); i += 100 {
				r.get(t, warm[i:i+100], "Tag_Profile_IM_Nick")
			}
			tc.fault(sim)
			var warmFailed, wrong, coldOK, coldFailed, badCode, late atomic.Int64
			var next atomic.Int64
			next.Store(50_000)
			stop := time.Now().Add(1500 * time.Millisecond)
			var wg sync.WaitGroup
			for w := range 30 {
				wg.Go(func() {
					for i := 0; time.Now().Before(stop); i++ {
						a, isWarm := warm[(w*31+i*7)%len(warm)], true
						if i%2 == 1 {
							a, isWarm = imsim.AccountName(int(next.Add(1))), false
						}
						begin := time.Now()
						out, err := r.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick")
						if time.Since(begin) > timeout+time.Second {
							late.Add(1)
						}
						switch {
						case err != nil:
							badCode.Add(1)
						case out.ErrorCode != 0:
							if isWarm {
								warmFailed.Add(1)
							} else if !tc.codes[out.ErrorCode] {
								t.Errorf("cold %s: code %d (%s)", a, out.ErrorCode, out.ErrorInfo)
								badCode.Add(1)
							} else {
								coldFailed.Add(1)
							}
						default:
							want, _ := imsim.SeededValue(a, "Tag_Profile_IM_Nick")
							if it := out.UserProfileItem[0]; it.ToAccount != a || string(it.ProfileItem[0].Value) != string(want) {
								wrong.Add(1)
							} else if !isWarm {
								coldOK.Add(1)
							}
						}
					}
				})
			}
			wg.Wait()
			st := sim.Stats()
			t.Logf("cold: %d answered, %d failed with clear codes; warm failed %d; wrong %d; late %d; emulator: %d calls, max %d in a sliding second",
				coldOK.Load(), coldFailed.Load(), warmFailed.Load(), wrong.Load(), late.Load(), st.Calls, st.MaxCallsPerSec)
			if warmFailed.Load() != 0 || wrong.Load() != 0 || badCode.Load() != 0 || late.Load() != 0 {
				t.Fatalf("warm failed %d, wrong %d, unclear %d, late %d", warmFailed.Load(), wrong.Load(), badCode.Load(), late.Load())
			}
			if st.MaxCallsPerSec > quota {
				t.Fatalf("quota broken: %d calls in a sliding second", st.MaxCallsPerSec)
			}
			if tc.name != "slow" && coldFailed.Load() == 0 {
				t.Fatal("no cold lookup failed: the fault was not exercised")
			}
		})
	}
}
