package wait_test

import (
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/goleak"

	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a testing.TB that records a failure instead of stopping the
// goroutine, so For's failing path can be checked.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
}

// TestForReturnsOnceTrue: For returns within a poll step of the condition
// becoming true (the bubble's clock makes the step exact).
func TestForReturnsOnceTrue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		ready := start.Add(100 * time.Millisecond)
		wait.For(t, 5*time.Second, "the flag", func() bool { return !time.Now().Before(ready) })
		if d := time.Since(start); d < 100*time.Millisecond || d > 100*time.Millisecond+20*time.Millisecond {
			t.Fatalf("For returned after %v for a condition true after 100ms", d)
		}
	})
}

func TestForFailsWithWhat(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &recorder{TB: t}
		start := time.Now()
		wait.For(r, time.Second, "the impossible", func() bool { return false })
		if r.failed != "timed out after 1s waiting for the impossible" {
			t.Fatalf("failure %q", r.failed)
		}
		if d := time.Since(start); d < time.Second || d > time.Second+20*time.Millisecond {
			t.Fatalf("gave up after %v, want just past the 1s timeout", d)
		}
	})
}
