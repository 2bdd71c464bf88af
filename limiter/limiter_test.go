package limiter

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// TestLocalNeverOverQuota drives the limiter from many goroutines in a
// synctest bubble (time is exact and instant) and checks every sliding
// second of grants, widened by the guard on both sides.
func TestLocalNeverOverQuota(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const quota = 100
		l, err := NewLocal(Config{Rate: quota})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		grants := make(chan time.Time, 10000)
		for range 50 {
			go func() {
				for l.Wait(ctx) == nil {
					grants <- time.Now()
				}
			}()
		}
		<-ctx.Done()
		synctest.Wait()
		close(grants)
		var ts []time.Time
		for g := range grants {
			ts = append(ts, g)
		}
		// A window of 1s+guard holds at most quota grants: a call that
		// reaches the upstream up to guard late still counts within quota.
		j := 0
		for i := range ts {
			for ts[i].Sub(ts[j]) >= time.Second+DefaultGuard {
				j++
			}
			if n := i - j + 1; n > quota {
				t.Fatalf("%d grants within 1s+guard ending at %v", n, ts[i])
			}
		}
		// And it does not starve: 5 s at 100/s with the guard is ≥ 490.
		if len(ts) < 490 {
			t.Fatalf("only %d grants in 5s", len(ts))
		}
		t.Logf("%d grants in 5s, interval %v", len(ts), l.Interval())
	})
}

func TestLocalBackoffAndCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l, _ := NewLocal(Config{Rate: 100})
		start := time.Now()
		if err := l.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		l.Backoff(2 * time.Second)
		l.Backoff(time.Second) // shorter: ignored
		if err := l.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d < 2*time.Second {
			t.Fatalf("granted after %v despite a 2s backoff", d)
		}
		l.Backoff(time.Hour)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if err := l.Wait(ctx); err != context.DeadlineExceeded {
			t.Fatalf("Wait during backoff = %v", err)
		}
	})
}

func TestNewLocalRejectsBadRate(t *testing.T) {
	for _, r := range []float64{0, -1} {
		if _, err := NewLocal(Config{Rate: r}); err == nil {
			t.Errorf("rate %v accepted", r)
		}
	}
}
