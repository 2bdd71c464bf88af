// Package limiter keeps upstream calls within the app's quota.
//
// The upstream counts calls in a sliding one-second window and rejects the
// call that would make it more than the quota. A token bucket with a burst
// above one, or grants that reach the upstream bunched by network jitter,
// can overshoot that window even when the long-run rate is right. Local
// therefore grants one call at a time, spaced (1s + Guard)/Rate apart: any
// one-second window at the upstream then holds at most Rate calls as long as
// jitter between two calls' transit times stays under Guard.
//
// A throttling answer from the upstream means the count is off anyway (other
// clients of the same app, clock skew): Backoff pauses all grants for a
// while. Local is safe for concurrent use.
package limiter

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Limiter grants permission for one upstream call. Wait blocks until the
// call may start or ctx is done, in which case it returns ctx's error and
// consumes nothing.
type Limiter interface {
	Wait(ctx context.Context) error
}

// DefaultGuard is the default allowance for jitter between grant and arrival.
const DefaultGuard = 20 * time.Millisecond

// Config configures a Local limiter.
type Config struct {
	// Rate is the quota in calls per second. Required, > 0.
	Rate float64
	// Guard widens the spacing so that Rate calls span at least 1s+Guard.
	// Zero means DefaultGuard; negative means none.
	Guard time.Duration
}

// Local is the in-process limiter. Create it with NewLocal.
type Local struct {
	lim      *rate.Limiter
	interval time.Duration

	mu          sync.Mutex
	pausedUntil time.Time
}

// NewLocal validates cfg and returns a Local limiter.
func NewLocal(cfg Config) (*Local, error) {
	if cfg.Rate <= 0 {
		return nil, fmt.Errorf("limiter: rate %v must be positive", cfg.Rate)
	}
	if cfg.Guard == 0 {
		cfg.Guard = DefaultGuard
	}
	if cfg.Guard < 0 {
		cfg.Guard = 0
	}
	interval := time.Duration(float64(time.Second+cfg.Guard) / cfg.Rate)
	return &Local{lim: rate.NewLimiter(rate.Every(interval), 1), interval: interval}, nil
}

// Interval is the spacing between two grants.
func (l *Local) Interval() time.Duration { return l.interval }

// Wait blocks until a call may start, as Limiter says.
func (l *Local) Wait(ctx context.Context) error {
	for {
		l.mu.Lock()
		pause := time.Until(l.pausedUntil)
		l.mu.Unlock()
		if pause <= 0 {
			break
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	return l.lim.Wait(ctx)
}

// Backoff pauses every grant for d from now (a longer pause already in force
// is kept). Calls already granted are not recalled.
func (l *Local) Backoff(d time.Duration) {
	until := time.Now().Add(d)
	l.mu.Lock()
	if until.After(l.pausedUntil) {
		l.pausedUntil = until
	}
	l.mu.Unlock()
}

// ErrClosed is returned by limiters that have been shut down.
var ErrClosed = errors.New("limiter: closed")
