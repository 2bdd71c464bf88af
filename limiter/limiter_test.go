package limiter

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// call is one simulated upstream call: sent at s, counted by the upstream
// at a (any moment in between), answered at r.
type call struct{ s, a, r time.Time }

// TestLocalNeverOverQuota drives the limiter from many goroutines in a
// synctest bubble (time is exact and instant) with random latencies, lets
// the simulated upstream count each call at a random point of its flight
// (the worst case for bunching), and checks every sliding second.
func TestLocalNeverOverQuota(t *testing.T) {
	for _, latency := range []time.Duration{0, 20 * time.Millisecond, 300 * time.Millisecond} {
		t.Run(latency.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const quota = 100
				l, err := NewLocal(Config{Rate: quota, Burst: 10})
				if err != nil {
					t.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				var mu sync.Mutex
				var calls []call
				rng := rand.New(rand.NewPCG(1, uint64(latency)))
				var wg sync.WaitGroup
				for range 50 {
					wg.Go(func() {
						for {
							p, err := l.Acquire(ctx)
							if err != nil {
								return
							}
							mu.Lock()
							d := latency/2 + time.Duration(rng.Int64N(int64(latency)+1))
							frac := rng.Float64()
							mu.Unlock()
							s := time.Now()
							time.Sleep(d)
							p.Done()
							mu.Lock()
							calls = append(calls, call{s: s, a: s.Add(time.Duration(frac * float64(d))), r: time.Now()})
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				// Every window (t-1s, t] ending at an arrival holds ≤ quota arrivals.
				for _, c := range calls {
					n := 0
					for _, o := range calls {
						if !o.a.After(c.a) && c.a.Sub(o.a) < time.Second {
							n++
						}
					}
					if n > quota {
						t.Fatalf("%d calls counted in the second ending %v", n, c.a)
					}
				}
				// And it does not starve: about quota/(1s+latency) per second.
				want := int(4.5 * quota / (1 + 2*latency.Seconds()))
				if len(calls) < want {
					t.Fatalf("only %d calls in 5s, want ≥ %d", len(calls), want)
				}
				t.Logf("latency %v: %d calls in 5s", latency, len(calls))
			})
		})
	}
}

func TestLocalBackoffAndCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, _ := NewLocal(Config{Rate: 100})
		start := time.Now()
		p, err := l.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		p.Done()
		p.Done() // second end is a no-op
		l.Backoff(2 * time.Second)
		l.Backoff(time.Second) // shorter: ignored
		p, err = l.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		p.Cancel()
		if d := time.Since(start); d < 2*time.Second {
			t.Fatalf("granted after %v despite a 2s backoff", d)
		}
		l.Backoff(time.Hour)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := l.Acquire(ctx); err != context.DeadlineExceeded {
			t.Fatalf("Acquire during backoff = %v", err)
		}
	})
}

// TestLocalInFlightHoldsSlots: with every slot taken by a call still in
// flight, nothing more is granted until one is answered and a second has
// passed since.
func TestLocalInFlightHoldsSlots(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, _ := NewLocal(Config{Rate: 3, Burst: 3, Guard: -1})
		var ps []*Permit
		for range 3 {
			p, err := l.Acquire(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		time.Sleep(5 * time.Second) // long calls
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := l.Acquire(ctx); err == nil {
			t.Fatal("granted a fourth call while three are in flight")
		}
		ps[0].Done()
		ps[1].Cancel() // never made: frees its slot at once
		start := time.Now()
		p, err := l.Acquire(context.Background())
		if err != nil || time.Since(start) != 0 {
			t.Fatalf("cancelled slot not reused at once: %v after %v", err, time.Since(start))
		}
		p.Cancel()
		p, err = l.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		p.Cancel()
		// That was the cancelled slot again; the answered one frees 1s after its answer.
		ps[2].Done()
		ps3, _ := l.Acquire(context.Background())
		if got := time.Since(start); got != 0 {
			t.Fatalf("free slot waited %v", got)
		}
		ctx2, cancel2 := context.WithTimeout(context.Background(), 999*time.Millisecond)
		defer cancel2()
		if _, err := l.Acquire(ctx2); err == nil {
			t.Fatal("granted a call within a second of two answers")
		}
		ps3.Done()
	})
}

func TestNewLocalRejectsBadRate(t *testing.T) {
	for _, r := range []float64{0, -1} {
		if _, err := NewLocal(Config{Rate: r}); err == nil {
			t.Errorf("rate %v accepted", r)
		}
	}
}

// TestRateCut: the factor a throttling answer leaves, its climb back, the
// one-cut-per-window rule and the floor.
func TestRateCut(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	var c rateCut
	if f := c.factorAt(t0); f != 1 {
		t.Fatalf("uncut factor %v", f)
	}
	if !c.cutAt(t0) || c.factorAt(t0) != CutFactor {
		t.Fatalf("first cut left %v", c.factorAt(t0))
	}
	if c.cutAt(t0.Add(CutEvery / 2)) {
		t.Fatal("cut twice within one window")
	}
	if f := c.factorAt(t0.Add(2 * time.Second)); f < 0.699 || f > 0.701 {
		t.Fatalf("factor 2s after a cut to 0.5 = %v, want 0.7", f)
	}
	if f := c.factorAt(t0.Add(time.Minute)); f != 1 {
		t.Fatalf("factor a minute later = %v", f)
	}
	at := t0.Add(time.Second) // the factor climbed to 0.6: cut to 0.3
	if !c.cutAt(at) || c.factorAt(at) < 0.299 || c.factorAt(at) > 0.301 {
		t.Fatalf("second cut left %v, want 0.3", c.factorAt(at))
	}
	for range 10 {
		at = at.Add(CutEvery)
		c.cutAt(at)
	}
	// A cut a second (climbing 0.1 between) tends to the floor, never below.
	if f := c.factorAt(at); f < MinFactor || f > MinFactor+0.01 {
		t.Fatalf("after many cuts the factor is %v, want about the floor %v", f, MinFactor)
	}
	c = rateCut{factor: 0.05, when: at}
	if c.cutAt(at.Add(CutEvery)); c.factorAt(at.Add(CutEvery)) != MinFactor {
		t.Fatalf("a cut from 0.15 left %v, want the floor", c.factorAt(at.Add(CutEvery)))
	}
}

// TestLocalThrottledLowersRate: after a throttling answer the limiter
// pauses, then grants at the cut rate, climbing back; calls answered at
// once, so only the spacing and the window bound them.
func TestLocalThrottledLowersRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, _ := NewLocal(Config{Rate: 100})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var mu sync.Mutex
		var grants []time.Time
		go func() {
			for {
				p, err := l.Acquire(ctx)
				if err != nil {
					return
				}
				mu.Lock()
				grants = append(grants, time.Now())
				mu.Unlock()
				p.Done()
			}
		}()
		time.Sleep(2 * time.Second)
		start := time.Now()
		l.Throttled(500 * time.Millisecond)
		if f := l.Factor(); f != CutFactor {
			t.Fatalf("factor after a throttle %v", f)
		}
		time.Sleep(5500 * time.Millisecond)
		cancel()
		synctest.Wait()
		count := func(from, to time.Duration) (n int) {
			for _, g := range grants {
				if !g.Before(start.Add(from)) && g.Before(start.Add(to)) {
					n++
				}
			}
			return n
		}
		// Paused 500ms (a grant already past the spacer may still land).
		if n := count(time.Millisecond, 500*time.Millisecond); n > 1 {
			t.Fatalf("%d grants during the pause", n)
		}
		// Then 0.55–0.65 of the rate, 0.8–0.9 three seconds on, all of it
		// after five.
		if n := count(500*time.Millisecond, 1500*time.Millisecond); n < 50 || n > 66 {
			t.Fatalf("%d grants in the second after the pause, want about 60", n)
		}
		if n := count(3*time.Second, 4*time.Second); n < 78 || n > 92 {
			t.Fatalf("%d grants 3s after the cut, want about 85", n)
		}
		if n := count(4500*time.Millisecond, 5500*time.Millisecond); n < 97 {
			t.Fatalf("%d grants 5s after the cut, want 100", n)
		}
		if f := l.Factor(); f != 1 {
			t.Fatalf("factor 5.5s after the cut = %v, want 1 again", f)
		}
	})
}
