// Package limiter keeps upstream calls within the app's quota.
//
// The upstream counts calls in a sliding one-second window and rejects the
// call that would make it more than the quota. A token bucket alone cannot
// promise that: grants that reach the upstream bunched by network or
// scheduling jitter can put quota+1 calls in one second even when the
// long-run rate is right. Local therefore combines two mechanisms:
//
//   - a window of in-flight accounting, which is the hard guarantee. The
//     upstream counts a call somewhere between the moment it is sent and the
//     moment its answer is back. A call released at r can share a window
//     only with calls sent before r+1s; a call still in flight can share one
//     with any call. So a new call may start only while fewer than Quota
//     calls are in flight or were answered within the last second (plus
//     Guard). Whatever the jitter, no sliding second at the upstream then
//     holds more than Quota calls. At latency L this allows
//     Quota/(1s+L) calls per second: 98/s for a quota of 100 at 20 ms.
//   - a token bucket (golang.org/x/time/rate) at Rate with a burst of one,
//     which spaces calls evenly instead of letting a full window leave at
//     once. It still is not the binding limit (the window allows only
//     Quota/(1s+L), a little less), but it keeps calls from bunching and
//     then stalling on the window once a second (see spacerHeadroom).
//
// A throttling answer from the upstream means the count is off anyway
// (another client of the same app uses part of the quota, say): Throttled
// pauses all grants for a moment and lowers the effective rate, which then
// climbs back (see Cut). Local is safe for concurrent use.
//
// A limiter given Metrics keeps its own figures: quota_calls_per_second,
// limiter_rate_factor and, for Shared, limiter_fallback.
package limiter

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Limiter grants permission for one upstream call. Acquire blocks until the
// call may start or ctx is done (then it returns ctx's error and holds
// nothing). The caller must end every Permit it gets: Done when the call's
// answer or failure is in, Cancel when no call was made after all. Local
// and Shared also take throttling answers and report their rate; their
// users declare the parts they need (batcher.Limiter).
type Limiter interface {
	Acquire(ctx context.Context) (*Permit, error)
}

// Permit is one granted call. End it exactly once; later calls are no-ops.
type Permit struct {
	once   sync.Once
	end    func(called bool)
	scarce bool
}

// Scarce reports whether the grant had to wait for the quota (a slot of
// the window to free up; for Shared also the spacing of all replicas'
// grants), not just for this process's spacer: the quota, not the load,
// is the limit right now.
func (p *Permit) Scarce() bool { return p.scarce }

// NewPermit returns a Permit that runs end(true) on Done and end(false) on
// Cancel, once. It is for Limiter implementations.
func NewPermit(end func(called bool)) *Permit { return &Permit{end: end} }

// Done records that the call was made and its answer (or failure) is in.
func (p *Permit) Done() { p.once.Do(func() { p.end(true) }) }

// Cancel records that no call was made with this permit.
func (p *Permit) Cancel() { p.once.Do(func() { p.end(false) }) }

// spacerHeadroom is how much faster than the quota the spacer runs. At the
// quota itself calls leave evenly and each waits a few milliseconds on the
// window at most; faster (1.1× measured) they bunch, fill the window early
// and then stall on it for ~100 ms once a second: a p99 of 135 ms at any
// load instead of 42 ms at 1,000 lookups/s, for the same saturation
// throughput (the window, not the spacer, bounds it).
const spacerHeadroom = 1.0

// Cut is how a throttling answer lowers the effective rate: the rate
// (spacing and window alike) is multiplied by CutFactor, at most once per
// CutEvery (the calls that went out before a cut take a window to show
// its effect) and never below MinFactor of the quota; it then climbs back
// by RecoverPerSecond of the quota each second. This is AIMD, as in TCP: a
// pause alone would resume at the full rate into the same wall once the
// pause ends, for as long as the other client keeps its share.
const (
	CutFactor        = 0.5
	MinFactor        = 0.1
	RecoverPerSecond = 0.1
	CutEvery         = time.Second
)

// rateCut is the effective rate's state: the factor set by the last cut
// and when.
type rateCut struct {
	factor float64
	when   time.Time
}

// factorAt is the factor at now: the last cut's, climbed back since.
func (c rateCut) factorAt(now time.Time) float64 {
	if c.when.IsZero() {
		return 1
	}
	return min(1, c.factor+now.Sub(c.when).Seconds()*RecoverPerSecond)
}

// cutAt applies a throttling answer at now and reports whether it cut (not
// within CutEvery of the last cut).
func (c *rateCut) cutAt(now time.Time) bool {
	if !c.when.IsZero() && now.Sub(c.when) < CutEvery {
		return false
	}
	c.factor, c.when = max(MinFactor, c.factorAt(now)*CutFactor), now
	return true
}

// DefaultGuard widens the one-second window a little, for clock granularity.
const DefaultGuard = 2 * time.Millisecond

// Config configures a Local limiter.
type Config struct {
	// Rate is the quota in calls per second. Required, > 0. The window
	// admits floor(Rate) calls (at least one).
	Rate float64
	// Guard widens the window beyond one second. Zero means DefaultGuard;
	// negative means none.
	Guard time.Duration
	// Burst is the token bucket's burst: how many calls may leave back to
	// back. Zero means 1 (evenly spaced). The window holds the quota either way.
	Burst int
	// Metrics, if set, receive the limiter's own figures (see observe).
	// Nil: none — a process's second limiter (portrait_set's quota) leaves
	// them to its lookup limiter.
	Metrics *metrics.Metrics
}

// Local is the in-process limiter. Create it with NewLocal.
type Local struct {
	spacer *rate.Limiter
	rate   float64
	quota  int
	span   time.Duration    // one second plus the guard
	m      *metrics.Metrics // nil: no figures

	mu          sync.Mutex
	inflight    int
	released    []time.Time   // answer times within the last span, oldest first
	changed     chan struct{} // closed and replaced when a call is released
	pausedUntil time.Time
	cut         rateCut
}

// NewLocal validates cfg and returns a Local limiter.
func NewLocal(cfg Config) (*Local, error) {
	if !(cfg.Rate > 0) || math.IsInf(cfg.Rate, 0) {
		return nil, fmt.Errorf("limiter: rate %v must be positive", cfg.Rate)
	}
	if cfg.Guard == 0 {
		cfg.Guard = DefaultGuard
	}
	if cfg.Guard < 0 {
		cfg.Guard = 0
	}
	if cfg.Burst <= 0 {
		cfg.Burst = 1
	}
	l := &Local{
		spacer:  rate.NewLimiter(rate.Limit(cfg.Rate*spacerHeadroom), cfg.Burst),
		rate:    cfg.Rate,
		quota:   max(1, int(cfg.Rate)),
		span:    time.Second + cfg.Guard,
		m:       cfg.Metrics,
		changed: make(chan struct{}),
	}
	start(l.m, cfg.Rate)
	return l, nil
}

// start sets a limiter's figures when it is made: quota_calls_per_second
// (the configured rate, for dashboards to draw calls/s against) and
// limiter_rate_factor at 1 (no cut yet). m may be nil.
func start(m *metrics.Metrics, rate float64) {
	if m != nil {
		m.Quota.Set(rate)
		m.RateFactor.Set(1)
	}
}

// observe sets limiter_rate_factor to factor(), the part of the rate in
// force. It is called after every grant and every throttling answer, the
// moments the factor is used or changed; between them it climbs back
// unseen (a scrape shows the value of the last grant). m may be nil.
func observe(m *metrics.Metrics, factor func() float64) {
	if m != nil {
		m.RateFactor.Set(factor())
	}
}

// Rate is the configured quota in calls per second (before any cut: see
// Factor).
func (l *Local) Rate() float64 { return l.rate }

// Acquire blocks until a call may start, as Limiter says. It takes a slot
// in the window first and then waits for the spacer, so calls that a window
// releases together still leave evenly spaced (the window would otherwise
// repeat any bunching a second later, forever).
func (l *Local) Acquire(ctx context.Context) (*Permit, error) {
	if err := l.waitPause(ctx); err != nil {
		return nil, err
	}
	waited, err := l.waitSlot(ctx)
	if err != nil {
		return nil, err
	}
	if f := l.Factor(); float64(l.spacer.Limit()) != l.rate*f*spacerHeadroom {
		l.spacer.SetLimit(rate.Limit(l.rate * f * spacerHeadroom))
	}
	if err := l.spacer.Wait(ctx); err != nil {
		l.release(false)
		return nil, err
	}
	p := NewPermit(l.release)
	p.scarce = waited
	observe(l.m, l.Factor)
	return p, nil
}

// waitSlot takes a slot in the window, waiting until one is free; waited
// says whether it had to.
func (l *Local) waitSlot(ctx context.Context) (waited bool, err error) {
	for ; ; waited = true {
		l.mu.Lock()
		now := time.Now()
		l.prune(now)
		f := l.cut.factorAt(now)
		if l.inflight+len(l.released) < max(1, int(float64(l.quota)*f)) {
			l.inflight++
			l.mu.Unlock()
			return waited, nil
		}
		changed := l.changed
		wait := time.Hour // every slot is in flight: wait for a release
		if len(l.released) > 0 {
			wait = l.released[0].Add(l.span).Sub(now)
		}
		if f < 1 {
			wait = min(wait, 100*time.Millisecond) // the rate climbs back: look again
		}
		l.mu.Unlock()
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return waited, ctx.Err()
		case <-changed:
			t.Stop()
		case <-t.C:
		}
	}
}

func (l *Local) prune(now time.Time) {
	cut := 0
	for cut < len(l.released) && now.Sub(l.released[cut]) >= l.span {
		cut++
	}
	if cut > 0 {
		l.released = append(l.released[:0], l.released[cut:]...)
	}
}

func (l *Local) release(called bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight--
	if called {
		l.released = append(l.released, time.Now())
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

func (l *Local) waitPause(ctx context.Context) error {
	for {
		pause := l.Paused()
		if pause <= 0 {
			return nil
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Throttled is told of a throttling answer: it pauses every grant for
// pause and cuts the effective rate (see Cut).
func (l *Local) Throttled(pause time.Duration) {
	l.Backoff(pause)
	l.mu.Lock()
	l.cut.cutAt(time.Now())
	l.mu.Unlock()
	observe(l.m, l.Factor)
}

// Paused is how much is left of a pause asked by Throttled or Backoff.
func (l *Local) Paused() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return max(0, time.Until(l.pausedUntil))
}

// Factor is the part of the rate in force now (1 unless throttling cut it).
func (l *Local) Factor() float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cut.factorAt(time.Now())
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
