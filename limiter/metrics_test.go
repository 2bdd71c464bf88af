package limiter

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// TestLocalKeepsItsMetrics: a limiter given Metrics sets
// quota_calls_per_second and limiter_rate_factor itself (at 1 when made,
// cut by a throttling answer, climbed back at the next grant); Rate is
// the configured rate. One without Metrics works as well.
func TestLocalKeepsItsMetrics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := metrics.New(prometheus.NewRegistry())
		l, err := NewLocal(Config{Rate: 50, Metrics: m})
		if err != nil {
			t.Fatal(err)
		}
		if q, f := testutil.ToFloat64(m.Quota), testutil.ToFloat64(m.RateFactor); q != 50 || f != 1 {
			t.Fatalf("made: quota %v factor %v, want 50 and 1", q, f)
		}
		l.Throttled(0)
		if f := testutil.ToFloat64(m.RateFactor); f != CutFactor {
			t.Fatalf("after a throttling answer: factor %v, want %v", f, CutFactor)
		}
		time.Sleep(2 * time.Second) // the rate climbs back RecoverPerSecond a second
		p, err := l.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		p.Done()
		if f, want := testutil.ToFloat64(m.RateFactor), CutFactor+2*RecoverPerSecond; f < want-1e-9 || f > want+1e-9 {
			t.Fatalf("at the next grant: factor %v, want %v", f, want)
		}

		o, err := NewLocal(Config{Rate: 200})
		if err != nil {
			t.Fatal(err)
		}
		o.Throttled(0)
		if p, err = o.Acquire(context.Background()); err != nil {
			t.Fatal(err)
		}
		p.Done()
		if o.Rate() != 200 || l.Rate() != 50 {
			t.Fatalf("Rate: %v, %v", o.Rate(), l.Rate())
		}
	})
}
