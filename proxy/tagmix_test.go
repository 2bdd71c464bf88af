package proxy_test

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// TestRandomTagSubsetsFullCalls: 1,000 callers at once, each asking one
// new account for a random subset of four tags (in random order), against
// a quota of 5 calls/s whose window five single lookups have just filled
// (so the lookups queue while the quota is the limit, whatever the CPU):
// the emulator records calls of 100 accounts (one may leave part full
// when the queue has not yet formed), and each caller gets exactly its
// tags, in its order, with the upstream's values.
func TestRandomTagSubsetsFullCalls(t *testing.T) {
	four := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Image", "Tag_Profile_IM_AllowType"}
	const quota = 5
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota}}, proxy.Config{Rate: quota})
	for i := range quota {
		r.get(t, []string{imsim.AccountName(499_000 + i)}, four[0])
	}
	warm := r.sim.Stats()
	var bad atomic.Int64
	var first sync.Once
	var wg sync.WaitGroup
	for i := range 1000 {
		rnd := rand.New(rand.NewPCG(uint64(i), 3))
		var tags []string
		for _, k := range rnd.Perm(4)[:1+rnd.IntN(4)] {
			tags = append(tags, four[k])
		}
		acc := imsim.AccountName(500_000 + i)
		wg.Go(func() {
			out, err := r.try(context.Background(), []string{acc}, tags...)
			ok := err == nil && out.ErrorCode == 0 && len(out.UserProfileItem) == 1 && out.UserProfileItem[0].ToAccount == acc &&
				len(out.UserProfileItem[0].ProfileItem) == len(tags)
			for k := 0; ok && k < len(tags); k++ {
				want, _ := imsim.SeededValue(acc, tags[k])
				p := out.UserProfileItem[0].ProfileItem[k]
				ok = p.Tag == tags[k] && bytes.Equal(p.Value, want)
			}
			if !ok {
				bad.Add(1)
				first.Do(func() { t.Errorf("%s asked %v: %+v, %v", acc, tags, out, err) })
			}
		})
	}
	wg.Wait()
	st := r.sim.Stats()
	st.Calls -= warm.Calls
	st.Accounts -= warm.Accounts
	t.Logf("%d calls, %.1f accounts per call, fullest %d", st.Calls, float64(st.Accounts)/float64(st.Calls), st.MaxAccounts)
	if bad.Load() != 0 {
		t.Fatalf("%d callers did not get exactly their tags", bad.Load())
	}
	if st.Accounts != 1000 || st.Calls > 11 || st.MaxAccounts != 100 {
		t.Fatalf("1,000 lookups took %d calls carrying %d accounts (fullest %d): calls not full", st.Calls, st.Accounts, st.MaxAccounts)
	}
}
