package limiter

import (
	"context"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

// drive runs callers goroutines acquiring from lims in turn for d; each
// simulated call takes latency and is counted by the "upstream" at a random
// moment of its flight. It returns the counted moments, sorted.
func drive(t *testing.T, lims []Limiter, callers int, latency, d time.Duration) []time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var mu sync.Mutex
	var at []time.Time
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() {
			lim := lims[i%len(lims)]
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			for {
				p, err := lim.Acquire(ctx)
				if err != nil {
					return
				}
				s := time.Now()
				time.Sleep(latency)
				e := time.Now()
				p.Done()
				mu.Lock()
				at = append(at, s.Add(time.Duration(rng.Float64()*float64(e.Sub(s)))))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	return at
}

// maxInSecond is the most moments in any sliding second.
func maxInSecond(at []time.Time) int {
	best, j := 0, 0
	for i := range at {
		for at[i].Sub(at[j]) >= time.Second {
			j++
		}
		best = max(best, i-j+1)
	}
	return best
}

func newShared(t *testing.T, client redis.UniversalClient, rate float64, onFallback func(bool)) *Shared {
	t.Helper()
	s, err := NewShared(SharedConfig{Client: client, App: "1400000000", Rate: rate, MaxHold: 2 * time.Second, OnFallback: onFallback})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSharedThreeReplicas: three limiters on one Redis (and on a cluster)
// hold the quota together in every sliding second, and use it.
func TestSharedThreeReplicas(t *testing.T) {
	for name, spec := range map[string]func(t *testing.T) redis.UniversalClient{
		"single": func(t *testing.T) redis.UniversalClient {
			return redis.NewClient(&redis.Options{Addr: redistest.Start(t).Addr()})
		},
		"cluster": func(t *testing.T) redis.UniversalClient {
			c := redistest.StartCluster(t, 3)
			return redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{c.Servers[0].Addr(), c.Servers[1].Addr()}})
		},
	} {
		t.Run(name, func(t *testing.T) {
			const quota = 50
			var lims []Limiter
			client := spec(t)
			defer client.Close()
			for range 3 {
				lims = append(lims, newShared(t, client, quota, nil))
			}
			at := drive(t, lims, 30, 15*time.Millisecond, 3*time.Second)
			if m := maxInSecond(at); m > quota {
				t.Fatalf("%d calls counted in one sliding second, quota %d", m, quota)
			}
			// About quota/(1s+latency) per second after the first second.
			if len(at) < int(2.5*quota) {
				t.Fatalf("only %d calls in 3s", len(at))
			}
			t.Logf("%d calls in 3s across 3 replicas, max %d in a sliding second", len(at), maxInSecond(at))
		})
	}
}

// TestSharedFallbackAndRecovery: with Redis gone, each replica uses its
// fallback share; when Redis is back, the shared window is used again and
// knows the calls made meanwhile.
func TestSharedFallbackAndRecovery(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, DialTimeout: 100 * time.Millisecond})
	defer client.Close()
	var fallbacks, recoveries atomic.Int32
	const quota = 40
	var lims []Limiter
	for range 3 {
		lims = append(lims, newShared(t, client, quota, func(on bool) {
			if on {
				fallbacks.Add(1)
			} else {
				recoveries.Add(1)
			}
		}))
	}
	srv.Kill()
	// The fallback grants nothing for its first window, then its share.
	at := drive(t, lims, 12, 5*time.Millisecond, 3*time.Second)
	if fallbacks.Load() != 3 {
		t.Fatalf("%d replicas fell back, want 3", fallbacks.Load())
	}
	// 3 replicas × 0.3 × 40 = 36 per second at most.
	if m := maxInSecond(at); m > quota {
		t.Fatalf("%d calls in a second on the fallback", m)
	}
	if len(at) < 40 {
		t.Fatalf("only %d calls in 3s on the fallback", len(at))
	}
	srv.Restart()
	// Time that must pass on the limiters' clock: a replica tries Redis
	// again a second after it last fell back, and the restarted server
	// gets the same second to settle (driving at once flapped replicas
	// under a loaded CI machine: 9 recoveries for 3).
	time.Sleep(1100 * time.Millisecond)
	wait.For(t, 5*time.Second, "every replica's second on the fallback over", func() bool {
		for _, l := range lims {
			if l.(*Shared).offline() {
				return false
			}
		}
		return true
	})
	at = drive(t, lims, 12, 5*time.Millisecond, 2*time.Second)
	if recoveries.Load() != 3 {
		t.Fatalf("%d replicas came back, want 3", recoveries.Load())
	}
	if m := maxInSecond(at); m > quota || m < quota*3/4 {
		t.Fatalf("%d calls in the busiest second after recovery (quota %d)", m, quota)
	}
}

// TestSharedThrottledReachesEveryReplica: a throttling answer seen by one
// replica pauses every replica and cuts the shared rate once, however many
// replicas report it at the same time.
func TestSharedThrottledReachesEveryReplica(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	const quota = 100
	a, b, c := newShared(t, client, quota, nil), newShared(t, client, quota, nil), newShared(t, client, quota, nil)
	a.Throttled(500 * time.Millisecond)
	b.Throttled(500 * time.Millisecond) // the same burst, seen by two more replicas: no second cut
	c.Throttled(500 * time.Millisecond)
	start := time.Now()
	p, err := b.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p.Done()
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("replica b granted after %v despite a's 500ms pause", d)
	}
	if f := b.Factor(); f < CutFactor || f > CutFactor+0.15 {
		t.Fatalf("replica b's factor after the cut = %v, want about %v", f, CutFactor)
	}
	// The next second holds about 0.6 of the quota across the replicas.
	at := drive(t, []Limiter{a, b, c}, 6, time.Millisecond, time.Second)
	if len(at) > int(0.75*quota) || len(at) < int(0.3*quota) {
		t.Fatalf("%d calls in the second after a cut to %v (quota %d)", len(at), CutFactor, quota)
	}
	t.Logf("%d calls in the second after the cut; factor now %.2f", len(at), c.Factor())
}

func TestSharedCancelFreesSlot(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	s := newShared(t, client, 2, nil)
	p1, _ := s.Acquire(context.Background())
	p2, _ := s.Acquire(context.Background())
	time.Sleep(600 * time.Millisecond) // past the spacing (one grant per 500ms): only the window can refuse
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := s.Acquire(ctx); err == nil {
		t.Fatal("third permit with two in flight at quota 2")
	}
	p1.Cancel()
	p3, err := s.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	p2.Done()
	p3.Done()
	if n := client.ZCard(context.Background(), s.zkey).Val(); n != 2 {
		t.Fatalf("window holds %d entries, want the 2 answered calls", n)
	}
}

// TestSharedSpacesGrantsAcrossReplicas: grants of all replicas together are
// spaced 1/rate apart (one interval of catch-up allowed), by Redis's clock.
// Each replica spacing only its own grants would let three replicas take
// the whole window in a third of a second and then stall.
func TestSharedSpacesGrantsAcrossReplicas(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	const rate, grants = 50, 24 // 20ms apart; the window (50) never binds
	var lims []*Shared
	for range 3 {
		lims = append(lims, newShared(t, client, rate, nil))
	}
	var wg sync.WaitGroup
	var n atomic.Int32
	for _, l := range lims {
		for range 2 {
			wg.Go(func() {
				for n.Add(1) <= grants {
					if _, err := l.Acquire(context.Background()); err != nil { // held: the score stays the grant time
						t.Error(err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	z := client.ZRangeWithScores(context.Background(), lims[0].zkey, 0, -1).Val()
	if len(z) != grants {
		t.Fatalf("%d grants in the window, want %d", len(z), grants)
	}
	const interval = 1000 / rate // ms
	for i := range z {
		for j := i + 1; j < len(z); j++ {
			// GCRA with one interval of tolerance: j-i+1 grants span at least
			// (j-i-1) intervals; 1ms for the scores' rounding.
			if span := z[j].Score - z[i].Score; span < float64((j-i-1)*interval-1) {
				t.Fatalf("grants %d and %d only %vms apart (%d intervals of %dms required)", i, j, span, j-i-1, interval)
			}
		}
	}
	if span := z[len(z)-1].Score - z[0].Score; span > float64(2*grants*interval) {
		t.Fatalf("%d grants took %vms at %d/s: the spacing wastes slots", grants, span, rate)
	}
}

// TestSharedSurvivesScriptFlush: a server that lost its script cache (a
// restart, or a replica promoted in a failover) answers NOSCRIPT; the
// limiter sends the script again instead of falling back.
func TestSharedSurvivesScriptFlush(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	var fellBack atomic.Bool
	s := newShared(t, client, 100, func(on bool) { fellBack.Store(fellBack.Load() || on) })
	for i := range 3 {
		p, err := s.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		p.Done()
		s.Throttled(time.Millisecond) // the throttle script too
		if _, err := srv.Do("SCRIPT", "FLUSH"); err != nil {
			t.Fatal(err)
		}
		if n := client.ZCard(context.Background(), s.zkey).Val(); n != int64(i+1) {
			t.Fatalf("window holds %d calls after %d", n, i+1)
		}
	}
	if fellBack.Load() {
		t.Fatal("NOSCRIPT made the limiter fall back")
	}
}

// TestSharedFirstComeFirstServed: three replicas always waiting take the
// slots in turn. Without the shared queue each slot goes to whichever
// replica's script runs first, and one can lose many in a row.
func TestSharedFirstComeFirstServed(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	const rate = 50 // a slot every 20ms
	var lims []*Shared
	for range 3 {
		lims = append(lims, newShared(t, client, rate, nil))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i, l := range lims {
		wg.Go(func() {
			for {
				p, err := l.Acquire(ctx)
				if err != nil {
					return
				}
				mu.Lock()
				order = append(order, i)
				mu.Unlock()
				p.Done()
			}
		})
	}
	wg.Wait()
	if len(order) < 40 {
		t.Fatalf("only %d grants in 1.5s at %d/s", len(order), rate)
	}
	// Between two grants of one replica the other two take at most a slot
	// each (one more for a wake-up that came late).
	last := map[int]int{}
	for k, i := range order {
		if j, ok := last[i]; ok && k-j > 4 {
			t.Fatalf("replica %d waited %d grants for its turn: %v", i, k-j, order)
		}
		last[i] = k
	}
	t.Logf("%d grants: %v", len(order), order)
}

// TestSharedQueueForgetsLeavers: an acquirer whose context ends leaves the
// queue at once, and one that vanished (a replica that died) is forgotten
// after waiterStale, with the slot held for it freed; neither blocks the
// others for longer than that.
func TestSharedQueueForgetsLeavers(t *testing.T) {
	srv := redistest.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	ctx := context.Background()
	a, b := newShared(t, client, 2, nil), newShared(t, client, 2, nil) // a slot every 500ms
	p, err := a.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p.Done()
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := a.Acquire(short); err == nil {
		t.Fatal("a second grant within the spacing")
	}
	if n := client.ZCard(ctx, a.wkey).Val(); n != 0 {
		t.Fatalf("%d waiters left in the queue after the only one gave up", n)
	}
	// A waiter that died first in the queue, without leaving.
	now := time.Now()
	client.ZAdd(ctx, a.wkey, redis.Z{Score: 0, Member: "dead"})
	client.ZAdd(ctx, a.skey, redis.Z{Score: float64(now.UnixMilli()), Member: "dead"})
	start := time.Now()
	p, err = b.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p.Done()
	if d := time.Since(start); d > waiterStale+time.Second {
		t.Fatalf("a dead waiter held b back %v", d)
	}
	if client.ZScore(ctx, a.zkey, "dead").Err() != redis.Nil || client.HExists(ctx, a.rkey, "dead").Val() {
		t.Fatal("the slot held for the dead waiter was not freed")
	}
}
