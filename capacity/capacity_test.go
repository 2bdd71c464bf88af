package capacity

import (
	"math"
	"reflect"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func near(t *testing.T, name string, got, want, rel float64) {
	t.Helper()
	if math.Abs(got-want) > rel*math.Abs(want) {
		t.Errorf("%s = %.6g, want %.6g (±%.2g%%)", name, got, want, 100*rel)
	}
}

func TestHarmonic(t *testing.T) {
	near(t, "H(1,1)", Harmonic(1, 1), 1, 1e-15)
	near(t, "H(3,1)", Harmonic(3, 1), 1+1.0/2+1.0/3, 1e-15)
	near(t, "H(4,2)", Harmonic(4, 2), 1+1.0/4+1.0/9+1.0/16, 1e-15)
	near(t, "H(4,0)", Harmonic(4, 0), 4, 1e-15)
	// past the exact terms the tail is integrated
	near(t, "H(1e7,1)", Harmonic(10_000_000, 1), math.Log(1e7)+0.5772156649015329+1/(2e7), 1e-10)
	near(t, "H(1e9,2)", Harmonic(1_000_000_000, 2), math.Pi*math.Pi/6-1e-9, 1e-10)
	z := NewZipf(1000, 1.1)
	near(t, "mass of all ranks", z.Mass(1, 1000), 1, 1e-12)
	near(t, "P(1)/P(2)", z.P(1)/z.P(2), math.Pow(2, 1.1), 1e-12)
}

// TestCallsByHand checks the batching model on cases worked out by hand.
func TestCallsByHand(t *testing.T) {
	for _, tt := range []struct {
		name        string
		m           []float64
		hold, win   time.Duration
		calls, shed float64
	}{
		{"none", []float64{0, 0}, 0, 0, 0, 0},
		// u = 10, T = 0.01: 1/(0.01 + e^-0.1/10) = 1/0.1004837
		{"light: about one call per account", []float64{10}, 0, 0, 1 / (0.01 + math.Exp(-0.1)/10), 0},
		// u = 500/(1+500·0.002) = 250 per replica, U = 500: 1/(0.01 + e^-5/500)
		{"two replicas near the quota", []float64{500, 500}, 0, 2 * time.Millisecond, 1 / (0.01 + math.Exp(-5)/500), 0},
		// T = 1.025/100: at most 97.56 calls, 9,756 accounts a second; the rest shed
		{"past the quota", []float64{20_000}, 25 * time.Millisecond, 2 * time.Millisecond, 100 / 1.025, 20_000 - 100*100/1.025},
	} {
		t.Run(tt.name, func(t *testing.T) {
			calls, shed := Calls(tt.m, 100, tt.hold, tt.win, 100)
			near(t, "calls", calls, tt.calls, 1e-12)
			near(t, "shed", shed, tt.shed, 1e-12)
		})
	}
}

// TestSizedByHand checks the model's arithmetic on counts chosen by hand.
func TestSizedByHand(t *testing.T) {
	k := Constants{CPULocalHit: 20 * time.Microsecond, CPURedisHit: 30 * time.Microsecond, CPUCold: 60 * time.Microsecond,
		HeapPerAccount: 275, HeapPerTag: 90, RedisPerAccount: 136, RedisPerTag: 22, RedisTripsPerRead: 0.5, LimiterOpsPerCall: 2, CoreBudget: 0.5}
	r := &Result{
		Workload: Workload{Replicas: 2, LocalAccounts: 10_000, Redis: true, Quota: 100, Hold: 25 * time.Millisecond},
		Seconds:  10,
		Counts: Counts{Lookups: 1e6, LocalFresh: 7e5, LocalStale: 1e5, RedisFresh: 1e5, RedisMiss: 1e5, Refreshes: 1e4, Fetches: 9e4,
			Calls: 500, CallAccounts: 1e5, RedisReads: 2e5, RedisWrites: 1e5, RedisChangeOps: 2e3, Changes: 1e3,
			LocalHeld: 2000, LocalTagsHeld: 4000, RedisLive: 100, RedisTagsLive: 200, RedisSteadyAcc: 5000},
	}
	r.Batcher.MaxAccounts = 100
	z := Sized(r, k)
	near(t, "lookups/s", z.Lookups, 1e5, 1e-12)
	near(t, "local hit", z.LocalHit, 0.8, 1e-12)
	near(t, "redis hit", z.RedisHit, 0.1, 1e-12)
	near(t, "miss", z.Miss, 0.1, 1e-12)
	near(t, "fetches/s", z.Fetches, 1e4, 1e-12)
	near(t, "calls/s", z.Calls, 50, 1e-12)
	near(t, "accounts per call", z.AccountsPerCall, 200, 1e-12)
	near(t, "quota use", z.QuotaUse, 0.5, 1e-12)
	near(t, "fetch capacity", z.FetchCapacity, 100*100/1.025, 1e-12)
	// (8e5·20µs + 1e5·30µs + 1e5·60µs + 1e4·40µs) / 10 s / 0.5 = (16 + 3 + 6 + 0.4) / 5
	near(t, "cores", z.Cores, 25.4/5, 1e-12)
	if z.Replicas != 6 {
		t.Errorf("replicas = %d, want 6", z.Replicas)
	}
	// 1000 accounts a replica, 2 tags each: 1000·275 + 1000·90
	near(t, "local heap", z.LocalHeap, 365_000, 1e-12)
	near(t, "local heap when full", z.LocalHeapFull, 10_000*275+10_000*90, 1e-12)
	// 5000 accounts, 2 tags each: 5000·136 + 5000·22
	near(t, "redis bytes", z.RedisBytes, 790_000, 1e-12)
	// (2e5 + 1e5 + 2e3)/10 + 50·2
	near(t, "redis ops", z.RedisOps, 30_300, 1e-12)
	// 2e4·0.5 reads + 50 write-back pipelines + 100 changes + 100 limiter
	near(t, "redis trips", z.RedisTrips, 10_250, 1e-12)
}

func smallWorkload() Workload {
	return Workload{Rate: 2000, Accounts: 20_000, Skew: 0.9, Missing: 0.05, Replicas: 2, Redis: true,
		TTL: 10 * time.Second, StaleTTL: 20 * time.Second, NegativeTTL: 5 * time.Second, ChangeRate: 20,
		Tags: []TagSet{{Tags: []string{"Tag_Profile_IM_Nick"}, Weight: 2}, {Tags: []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Image"}, Weight: 1}}}
}

func TestSimulateDeterministic(t *testing.T) {
	w := smallWorkload()
	sc := SimConfig{Seed: 7, Warmup: 20 * time.Second, Duration: 40 * time.Second, Exact: 1000, Sample: 5000}
	a, err := Simulate(w, sc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Simulate(w, sc)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a.Counts, b.Counts) || a.Events != b.Events || a.Sampled != b.Sampled {
		t.Fatalf("same seed, different results:\n%+v\n%+v", a.Counts, b.Counts)
	}
	if a.Counts.LocalFresh == 0 || a.Counts.RedisFresh == 0 || a.Counts.LocalNeg == 0 || a.Counts.Changes == 0 || a.Counts.Fetches == 0 {
		t.Fatalf("the workload should exercise every path: %+v", a.Counts)
	}
	sc.Seed = 8
	c, err := Simulate(w, sc)
	if err != nil {
		t.Fatal(err)
	}
	if reflect.DeepEqual(a.Counts, c.Counts) {
		t.Fatal("another seed gave the very same counts")
	}
	near(t, "another seed's lookups", c.Counts.Lookups, a.Counts.Lookups, 0.02)
}

// TestSimulateEvictingAgrees: with full in-process tiers, cache.Local's
// sampled eviction makes runs differ, but only within sampling noise.
func TestSimulateEvictingAgrees(t *testing.T) {
	w := smallWorkload()
	w.LocalAccounts = 2000
	sc := SimConfig{Seed: 7, Warmup: 20 * time.Second, Duration: 40 * time.Second}
	a, err := Simulate(w, sc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Simulate(w, sc)
	if err != nil {
		t.Fatal(err)
	}
	za, zb := Sized(a, Measured), Sized(b, Measured)
	near(t, "local hit ratio", zb.LocalHit, za.LocalHit, 0.01)
	near(t, "fetches", zb.Fetches, za.Fetches, 0.03)
}

// ttlRun simulates one replica, no Redis, uniform popularity: each account
// is looked up at r = rate/accounts a second, Poisson.
func ttlRun(t *testing.T, w Workload) Size {
	t.Helper()
	w.Replicas, w.Skew = 1, 0
	r, err := Simulate(w, SimConfig{Seed: 3, Warmup: 2 * time.Minute, Duration: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	return Sized(r, Measured)
}

// TestSimulateFollowsTheCachePolicy: the hit ratios move with the TTLs as a
// TTL cache's do. With Poisson lookups at r a second, a value fetched at a
// miss serves every lookup for the next T, so a miss starts a cycle of
// mean T + 1/r holding r·T hits: miss ratio 1/(1 + r·T). The records are
// the cache's (cache.Cache.Fetched): if its TTLs were not the ones given,
// or stale or negative entries were served otherwise, these would fail.
func TestSimulateFollowsTheCachePolicy(t *testing.T) {
	base := Workload{Rate: 1000, Accounts: 10_000, StaleTTL: time.Millisecond} // r = 0.1/s
	for _, ttl := range []time.Duration{10 * time.Second, 30 * time.Second} {
		w := base
		w.TTL = ttl
		z := ttlRun(t, w)
		rt := 0.1 * ttl.Seconds()
		near(t, "miss ratio at ttl "+ttl.String(), z.Miss, 1/(1+rt), 0.03)
		near(t, "fetches/s at ttl "+ttl.String(), z.Fetches, 1000/(1+rt), 0.03)
	}
	// Stale serving: past fresh a lookup is answered from the cache and
	// the value refreshed behind it; as many fetches, hardly any misses.
	w := base
	w.TTL, w.StaleTTL = 10*time.Second, time.Hour
	z := ttlRun(t, w)
	near(t, "fetches/s with stale serving", z.Fetches, 1000/(1+1), 0.03)
	if z.Miss > 0.01 {
		t.Errorf("miss ratio with stale serving %.4f, want only the first lookups", z.Miss)
	}
	// Accounts that do not exist are remembered for the negative TTL.
	w = base
	w.Missing, w.TTL, w.NegativeTTL = 1, time.Hour, 20*time.Second
	z = ttlRun(t, w)
	near(t, "miss ratio of missing accounts", z.Miss, 1/(1+0.1*20), 0.03)
}

// TestSimulateChanges: applied changes cost no fetch; unsigned callbacks
// (invalidate) cost the fetches of the clock skew after each change. A
// fetch replaces a tombstone only when sent more than the skew after it
// (cache supersedes, write.lua alike), so for that second every lookup of
// the account misses both tiers: each replica fetches it once per batch
// cycle (window + hold) in which it is looked up, then once more past the
// skew, and the other replicas find that one in Redis.
func TestSimulateChanges(t *testing.T) {
	w := Workload{Rate: 5000, Accounts: 1000, Skew: 0.5, Replicas: 3, Redis: true, TTL: time.Hour, ChangeRate: 50}
	sc := SimConfig{Seed: 5, Warmup: time.Minute, Duration: 2 * time.Minute}
	fetches := map[ChangeMode]float64{}
	for _, m := range []ChangeMode{ChangeApply, ChangeInvalidate} {
		w.ChangeMode = m
		r, err := Simulate(w, sc)
		if err != nil {
			t.Fatal(err)
		}
		fetches[m] = Sized(r, Measured).Fetches
	}
	if fetches[ChangeApply] > 0.5 {
		t.Errorf("applied changes: %.2f fetches/s, want none once warm", fetches[ChangeApply])
	}
	// Per change of account k, looked up at λ a second on each replica:
	// fetches in the skew's second, a renewal of waiting for a lookup
	// (1/λ) and a fetch's cycle c, are λ/(1 + λc) per replica; then one.
	skew := cache.DefaultClockSkew.Seconds()
	cycle := (batcher.DefaultWindow + 25*time.Millisecond + time.Millisecond).Seconds()
	z := NewZipf(w.Accounts, w.Skew)
	want := 0.0
	for k := 1; k <= w.Accounts; k++ {
		lam := w.Rate * z.P(k) / float64(w.Replicas)
		want += w.ChangeRate * z.P(k) * (float64(w.Replicas)*lam*skew/(1+lam*cycle) + 1)
	}
	near(t, "fetches/s for invalidating changes", fetches[ChangeInvalidate], want, 0.15)
}

// TestSimulateInvalidationRecovers: after an invalidation the in-process
// tier serves the account again once a fetch sent past the clock skew is
// stored, as cache.Get does. A fetch sent within the skew of the tombstone
// is kept out of both tiers (supersedes; write.lua with the same skew), and
// a Redis value the replica's tombstone outranks is a miss there, not a
// Redis hit (cache.getRemote answers from the merged record). The shared
// tier used to merge with no skew: it kept that early fetch, every later
// lookup was counted a Redis hit, and the replica's tombstone was never
// replaced (60 % of lookups "from Redis" at 200 invalidations/s).
func TestSimulateInvalidationRecovers(t *testing.T) {
	// one account, 2,000 lookups/s over 2 replicas, an invalidation every
	// 20 s: each costs about a second (the skew) of misses, ~5 %
	w := Workload{Rate: 2000, Accounts: 1, Replicas: 2, Redis: true, TTL: time.Hour, ChangeRate: 0.05, ChangeMode: ChangeInvalidate}
	r, err := Simulate(w, SimConfig{Seed: 7, Warmup: 10 * time.Second, Duration: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if r.Counts.Changes < 5 {
		t.Fatalf("%.0f changes simulated, want about 15", r.Counts.Changes)
	}
	z := Sized(r, Measured)
	if z.LocalHit < 0.85 || z.RedisHit > 0.02 {
		t.Errorf("after invalidations: in-process %.4f, Redis %.4f, upstream %.4f of lookups; want the in-process tier to serve again (>= 0.85) and Redis hardly ever (<= 0.02)",
			z.LocalHit, z.RedisHit, z.Miss)
	}
}

// TestSimulateLocalTierSize: a smaller in-process tier (cache.Local's
// eviction) serves less.
func TestSimulateLocalTierSize(t *testing.T) {
	w := Workload{Rate: 5000, Accounts: 50_000, Skew: 0.8, TTL: time.Hour}
	sc := SimConfig{Seed: 2, Warmup: time.Minute, Duration: time.Minute, Exact: 50_000, Sample: 50_000}
	hit := func(n int) float64 {
		w.LocalAccounts = n
		r, err := Simulate(w, sc)
		if err != nil {
			t.Fatal(err)
		}
		return Sized(r, Measured).LocalHit
	}
	big, small := hit(100_000), hit(2_000)
	if !(small < big-0.1) {
		t.Fatalf("hit ratio with 2,000 accounts %.3f, with 100,000 %.3f: want clearly less", small, big)
	}
}

func TestSimulateRejects(t *testing.T) {
	ok := Workload{Rate: 1, Accounts: 1}
	for _, tt := range []struct {
		name string
		edit func(*Workload, *SimConfig)
	}{
		{"no rate", func(w *Workload, _ *SimConfig) { w.Rate = 0 }},
		{"no accounts", func(w *Workload, _ *SimConfig) { w.Accounts = 0 }},
		{"negative skew", func(w *Workload, _ *SimConfig) { w.Skew = -1 }},
		{"missing > 1", func(w *Workload, _ *SimConfig) { w.Missing = 2 }},
		{"negative changes", func(w *Workload, _ *SimConfig) { w.ChangeRate = -1 }},
		{"unknown change mode", func(w *Workload, _ *SimConfig) { w.ChangeMode = "later" }},
		{"empty tag set", func(w *Workload, _ *SimConfig) { w.Tags = []TagSet{{Weight: 1}} }},
		{"batch too big", func(w *Workload, _ *SimConfig) { w.BatchMax = 101 }},
		{"no duration", func(_ *Workload, sc *SimConfig) { sc.Duration = 0 }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w, sc := ok, SimConfig{Duration: time.Second}
			tt.edit(&w, &sc)
			if _, err := Simulate(w, sc); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	if _, err := Simulate(ok, SimConfig{Duration: time.Second}); err != nil {
		t.Fatal(err)
	}
}
