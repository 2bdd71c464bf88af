package limiter

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Shared holds the quota for every replica of one app in Redis, with the
// same in-flight accounting as Local: a call may start only while fewer
// than Quota calls are in flight or were answered within the last second,
// counted across all replicas.
//
// Grants of all replicas together are also spaced 1/Rate apart and handed
// out first come, first served across replicas, in the same script (see
// acquireScript).
//
// State is one sorted set per app (members are permits; the score of a
// permit in flight is its grant time plus MaxHold, of an ended one its
// answer time), the next grant's time, the pause and the rate cut after
// throttling, and the queue of waiting acquirers, all under one hash tag
// so the Lua scripts work on Redis Cluster. Time is Redis's own (TIME),
// so replicas' clocks do not matter. A replica that dies with permits in
// flight holds their slots at most MaxHold plus a second.
//
// When Redis cannot be reached the replica falls back to a Local limiter
// at FallbackShare of the rate (so N replicas with share ≤ 1/N stay within
// the quota) and returns to Redis once it answers again, first recording
// the calls it made meanwhile so the shared window sees them. Shared is
// safe for concurrent use.
type Shared struct {
	cfg      SharedConfig
	spacer   *rate.Limiter
	fallback *Local
	zkey     string
	pkey     string
	nkey     string // next grant time: the shared spacing
	ckey     string // the last throttling cut of the rate
	// the queue of acquirers waiting for a slot: since when, last seen,
	// and slots reserved for them
	wkey, skey, rkey string
	// keys of the acquire and throttle scripts, and of the release script
	keys, releaseKeys []string
	factor            atomic.Int64 // ‰ of the rate in force, as Redis last said
	seq               atomic.Uint64
	prefix            string

	mu        sync.Mutex
	downUntil time.Time
	fellBack  bool // on the fallback since the last successful recover
	// transitionUntil: after a recovery, grants also keep to the fallback
	// share until then.
	transitionUntil time.Time
	// calls granted by the fallback, to record on recovery: member →
	// answer time (zero while in flight).
	offlineCalls map[string]time.Time
}

// DefaultFallbackShare is SharedConfig.FallbackShare's default: three
// replicas on their fallback shares stay within the quota.
const DefaultFallbackShare = 0.3

// SharedConfig configures a Shared limiter. Client, App and Rate are
// required.
type SharedConfig struct {
	Client redis.UniversalClient
	// App names the quota's owner (the SDKAppID).
	App string
	// Rate is the app's quota in calls per second.
	Rate float64
	// Guard widens the window beyond one second. Zero means DefaultGuard.
	Guard time.Duration
	// MaxHold bounds how long a permit can stay in flight (set it above
	// the upstream timeout). Zero means 10s.
	MaxHold time.Duration
	// FallbackShare is the part of Rate this replica may use while Redis
	// is unreachable. Zero (or more than 1) means DefaultFallbackShare.
	FallbackShare float64
	// Replica names this process in permit ids; empty means random.
	Replica string
	// OnFallback, if set, is told when the limiter leaves (true) or
	// returns to (false) the shared window.
	OnFallback func(bool)
	// Metrics, if set, receive the limiter's own figures: those of Local
	// (quota_calls_per_second at Rate, limiter_rate_factor) and
	// limiter_fallback, 1 while on the fallback share. Nil: none.
	Metrics *metrics.Metrics
}

// acquireScript grants a permit when the window has room and the shared
// spacing allows: grants of all replicas are spaced 1/rate apart (next_key
// holds the theoretical time of the next grant, in µs of Redis's clock; a
// grant may come up to one interval early, so a replica that wakes late
// does not lose the slot). Without the shared spacing each replica's own
// spacer would let N replicas fill the window in 1/N of a second and then
// stall the rest of it, which shows as a latency tail of most of a second.
// Window and spacing both shrink by the factor a throttling cut left.
//
// Slots go first come, first served across replicas: an acquirer that is
// refused registers in wait_key (member → when it first asked, µs) and
// seen_key (member → when it last asked, ms). When a slot is free and the
// caller is not the longest waiter, the slot is reserved for that waiter
// (held_key; its window entry is made at once) and the caller waits for the
// next one: the waiter finds the reservation when it wakes, which is about
// then, as every waiter is told the same time. Without this the replicas
// race for each slot, and one can lose many in a row. A waiter that stops
// asking for staleMs is forgotten, and a reservation it never took
// frees its slot.
//
// It returns {1, 0, f·1000} for a grant, else {0, µs to wait, f·1000}
// (wait -1: every slot is in flight, poll).
var acquireScript = redis.NewScript(acquireLua)

//go:embed scripts/acquire.lua
var acquireLua string

// acquireArgs are acquireScript's arguments (its keys are Shared.keys).
type acquireArgs struct {
	quota         int     // calls per window at the full rate
	spanMs        int64   // the window
	holdMs        int64   // how long a permit may stay in flight
	member        string  // the acquirer's place in the queue, and its permit
	intervalUs    float64 // the spacing of grants at the full rate
	recoverPerSec float64 // RecoverPerSecond
	staleMs       int64   // waiterStale
}

func (a acquireArgs) argv() []any {
	return []any{a.quota, a.spanMs, a.holdMs, a.member, a.intervalUs, a.recoverPerSec, a.staleMs}
}

// waiterStale is how long an acquirer may go without asking before the
// shared queue forgets it; Acquire asks at least every waiterStale/2.
const waiterStale = time.Second

// releaseScript ends a permit (called: the call was made, its slot counts
// until a window after now) or gives it up (the slot is free again), and
// takes the member out of the waiting queue and any reservation.
var releaseScript = redis.NewScript(releaseLua)

//go:embed scripts/release.lua
var releaseLua string

// releaseArgs are releaseScript's arguments (its keys are
// Shared.releaseKeys).
type releaseArgs struct {
	member string
	called bool
}

func (a releaseArgs) argv() []any {
	flag := "0"
	if a.called {
		flag = "1"
	}
	return []any{a.member, flag}
}

// recordScript adds calls made offline: pairs of member, age in ms (how
// long ago the call was answered; -1 while still in flight).
var recordScript = redis.NewScript(recordLua)

//go:embed scripts/record.lua
var recordLua string

// recordArgs are recordScript's arguments (its key is Shared.zkey).
type recordArgs struct {
	holdMs, spanMs int64
	calls          []any // member, age in ms (-1: in flight), …
}

func (a recordArgs) argv() []any { return append([]any{a.holdMs, a.spanMs}, a.calls...) }

// throttleScript pauses every replica for pauseMs (pause_key; the keys
// are acquireScript's) and cuts the rate (cut_key) unless it was cut
// within the last cutEveryMs: by cutFactor, not below minFactor; it climbs
// back by recoverPerSec per second. It returns the factor·1000 now in force.
// The factor's computation is the same in acquire.lua and throttle.lua
// (between "-- factor: begin" and "-- factor: end"): each script is whole,
// readable and loadable on its own, and a test keeps the copies equal.
var throttleScript = redis.NewScript(throttleLua)

//go:embed scripts/throttle.lua
var throttleLua string

// throttleArgs are throttleScript's arguments (its keys are Shared.keys).
type throttleArgs struct {
	pauseMs, cutEveryMs                 int64
	cutFactor, minFactor, recoverPerSec float64
}

func (a throttleArgs) argv() []any {
	return []any{a.pauseMs, a.cutEveryMs, a.cutFactor, a.minFactor, a.recoverPerSec}
}

// NewShared validates cfg and returns a Shared limiter.
func NewShared(cfg SharedConfig) (*Shared, error) {
	if cfg.Client == nil || cfg.App == "" {
		return nil, errors.New("limiter: SharedConfig.Client and App are required")
	}
	if !(cfg.Rate > 0) {
		return nil, fmt.Errorf("limiter: rate %v must be positive", cfg.Rate)
	}
	if cfg.Guard == 0 {
		cfg.Guard = DefaultGuard
	}
	if cfg.Guard < 0 {
		cfg.Guard = 0
	}
	if cfg.MaxHold <= 0 {
		cfg.MaxHold = 10 * time.Second
	}
	if cfg.FallbackShare <= 0 || cfg.FallbackShare > 1 {
		cfg.FallbackShare = DefaultFallbackShare
	}
	if cfg.Replica == "" {
		cfg.Replica = strconv.FormatUint(rand.Uint64(), 36)
	}
	fb, err := NewLocal(Config{Rate: cfg.Rate * cfg.FallbackShare, Guard: cfg.Guard})
	if err != nil {
		return nil, err
	}
	tag := "{pp:v1:" + cfg.App + "}"
	s := &Shared{cfg: cfg, fallback: fb, offlineCalls: map[string]time.Time{},
		spacer: rate.NewLimiter(rate.Limit(cfg.Rate*spacerHeadroom), 1),
		zkey:   tag + ":quota", pkey: tag + ":pause", nkey: tag + ":next", ckey: tag + ":cut",
		wkey: tag + ":wait", skey: tag + ":seen", rkey: tag + ":held", prefix: cfg.Replica + ":"}
	// In the order acquire.lua and release.lua name them.
	s.keys = []string{s.zkey, s.pkey, s.nkey, s.ckey, s.wkey, s.skey, s.rkey}
	s.releaseKeys = []string{s.zkey, s.wkey, s.skey, s.rkey}
	s.factor.Store(1000)
	start(cfg.Metrics, cfg.Rate)
	return s, nil
}

const redisTimeout = 250 * time.Millisecond

func (s *Shared) inTransition() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Now().Before(s.transitionUntil)
}

func (s *Shared) offline() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Now().Before(s.downUntil)
}

// goDown switches to the fallback for a second (then Redis is tried
// again). On entering the fallback it grants nothing for one window: the
// shared window may have been full of other replicas' calls, and only after
// a window has passed can the shares alone be trusted.
func (s *Shared) goDown() {
	s.mu.Lock()
	was := s.fellBack
	s.fellBack = true
	s.downUntil = time.Now().Add(time.Second)
	s.mu.Unlock()
	if !was {
		s.fallback.Backoff(time.Second + s.cfg.Guard)
		s.fellBackTo(true)
	}
}

// failed reports whether err means Redis is unreachable. A timeout is given
// one more chance by the caller first: a slow answer is not an outage.
func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// Acquire blocks until a call may start, as Limiter says.
func (s *Shared) Acquire(ctx context.Context) (*Permit, error) {
	p, err := s.acquire(ctx)
	if err == nil {
		observe(s.cfg.Metrics, s.Factor)
	}
	return p, err
}

// Rate is the app's configured quota in calls per second, for every
// replica together (before any cut: see Factor).
func (s *Shared) Rate() float64 { return s.cfg.Rate }

func (s *Shared) acquire(ctx context.Context) (*Permit, error) {
	// One member for the whole wait: it is this acquirer's place in the
	// shared queue, and its permit once granted.
	member := s.prefix + strconv.FormatUint(s.seq.Add(1), 36)
	for waited := false; ; waited = true {
		if s.offline() {
			return s.acquireOffline(ctx)
		}
		if !s.recover(ctx) {
			continue
		}
		var res []int64
		var err error
		for attempt, timeout := range []time.Duration{redisTimeout, 2 * redisTimeout} {
			rctx, cancel := context.WithTimeout(ctx, timeout)
			res, err = acquireScript.Run(rctx, s.cfg.Client, s.keys, acquireArgs{quota: int(s.cfg.Rate),
				spanMs: (time.Second + s.cfg.Guard).Milliseconds(), holdMs: s.cfg.MaxHold.Milliseconds(), member: member,
				intervalUs: 1e6 / s.cfg.Rate, recoverPerSec: RecoverPerSecond, staleMs: waiterStale.Milliseconds()}.argv()...).Int64Slice()
			cancel()
			if err == nil || !isTimeout(err) || ctx.Err() != nil || attempt == 1 {
				break
			}
			// Timed out: the script may have run. Give the member up (a
			// no-op if it never landed) and try once more before falling back.
			s.release(member, false)
			member = s.prefix + strconv.FormatUint(s.seq.Add(1), 36)
		}
		if err != nil {
			if ctx.Err() != nil {
				s.release(member, false) // leave the queue (and any slot held for us)
				return nil, ctx.Err()
			}
			s.goDown()
			continue
		}
		s.factor.Store(res[2])
		if res[0] == 1 {
			if err := s.spacer.Wait(ctx); err != nil {
				s.release(member, false)
				return nil, err
			}
			if s.inTransition() {
				// Other replicas may still be on their fallback shares, their
				// calls not yet in the shared window: keep to ours as well.
				fp, err := s.fallback.Acquire(ctx)
				if err != nil {
					s.release(member, false)
					return nil, err
				}
				p := NewPermit(func(called bool) { fp.end(called); s.release(member, called) })
				p.scarce = waited || fp.scarce
				return p, nil
			}
			p := NewPermit(func(called bool) { s.release(member, called) })
			p.scarce = waited
			return p, nil
		}
		wait := 20 * time.Millisecond // every slot in flight: poll
		if res[1] >= 0 {
			wait = time.Duration(res[1]) * time.Microsecond
		}
		// Ask again at least every waiterStale/2, or the queue forgets us.
		t := time.NewTimer(min(max(wait, 100*time.Microsecond), waiterStale/2))
		select {
		case <-ctx.Done():
			t.Stop()
			s.release(member, false) // leave the queue (and any slot held for us)
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func (s *Shared) release(member string, called bool) {
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	if err := releaseScript.Run(ctx, s.cfg.Client, s.releaseKeys, releaseArgs{member: member, called: called}.argv()...).Err(); err != nil {
		// The entry stays in flight until MaxHold: conservative, never over.
		s.goDown()
	}
}

// acquireOffline grants from the fallback share and remembers the call.
func (s *Shared) acquireOffline(ctx context.Context) (*Permit, error) {
	p, err := s.fallback.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	member := s.prefix + "o" + strconv.FormatUint(s.seq.Add(1), 36)
	span := time.Second + s.cfg.Guard
	now := time.Now()
	s.mu.Lock()
	for m, at := range s.offlineCalls { // forget calls the window no longer sees
		if !at.IsZero() && now.Sub(at) >= span {
			delete(s.offlineCalls, m)
		}
	}
	s.offlineCalls[member] = time.Time{}
	s.mu.Unlock()
	op := NewPermit(func(called bool) {
		p.end(called)
		s.mu.Lock()
		defer s.mu.Unlock()
		if _, ok := s.offlineCalls[member]; !ok {
			return // already recorded in Redis as in flight: it ages out there
		}
		if called {
			s.offlineCalls[member] = time.Now()
		} else {
			delete(s.offlineCalls, member) // never made: nothing to record
		}
	})
	op.scarce = p.scarce
	return op, nil
}

// recover records the fallback's calls of the last window in Redis before
// the shared window is used again; false if Redis failed again.
func (s *Shared) recover(ctx context.Context) bool {
	s.mu.Lock()
	if !s.fellBack {
		s.mu.Unlock()
		return true
	}
	span := time.Second + s.cfg.Guard
	args := recordArgs{holdMs: s.cfg.MaxHold.Milliseconds(), spanMs: span.Milliseconds()}
	now := time.Now()
	recorded := make([]string, 0, len(s.offlineCalls))
	for m, at := range s.offlineCalls {
		recorded = append(recorded, m)
		switch {
		case at.IsZero():
			args.calls = append(args.calls, m, -1)
		case now.Sub(at) < span:
			args.calls = append(args.calls, m, now.Sub(at).Milliseconds())
		}
	}
	s.mu.Unlock()
	if len(args.calls) > 0 {
		rctx, cancel := context.WithTimeout(ctx, redisTimeout)
		defer cancel()
		if err := recordScript.Run(rctx, s.cfg.Client, []string{s.zkey}, args.argv()...).Err(); err != nil {
			s.goDown()
			return false
		}
	}
	s.mu.Lock()
	for _, m := range recorded {
		delete(s.offlineCalls, m)
	}
	done := len(s.offlineCalls) == 0 // a fallback grant raced in: record it next time
	if done {
		s.fellBack = false
		// Replicas still on the fallback retry Redis within a second and
		// record their calls then; until a window after that, this replica
		// also keeps to its share (see Acquire).
		s.transitionUntil = time.Now().Add(2*time.Second + s.cfg.Guard)
	}
	s.mu.Unlock()
	if !done {
		return true
	}
	s.fellBackTo(false)
	return true
}

// fellBackTo tells the metrics and OnFallback that the limiter left (on)
// or returned to (!on) the shared window.
func (s *Shared) fellBackTo(on bool) {
	if m := s.cfg.Metrics; m != nil {
		if on {
			m.LimiterFallback.Set(1)
		} else {
			m.LimiterFallback.Set(0)
		}
	}
	if s.cfg.OnFallback != nil {
		s.cfg.OnFallback(on)
	}
}

// Throttled is told of a throttling answer: it pauses grants for pause on
// every replica and cuts the shared rate (see Cut), through Redis, and
// does the same to the fallback share.
func (s *Shared) Throttled(pause time.Duration) {
	s.fallback.Throttled(pause)
	ctx, cancel := context.WithTimeout(context.Background(), redisTimeout)
	defer cancel()
	f, err := throttleScript.Run(ctx, s.cfg.Client, s.keys, throttleArgs{pauseMs: pause.Milliseconds(),
		cutEveryMs: CutEvery.Milliseconds(), cutFactor: CutFactor, minFactor: MinFactor, recoverPerSec: RecoverPerSecond}.argv()...).Int64()
	if err != nil {
		s.goDown()
	} else {
		s.factor.Store(f)
	}
	observe(s.cfg.Metrics, s.Factor)
}

// Paused is how much is left of the pause this replica asked for after a
// throttling answer (the shared pause may be longer: another replica's).
func (s *Shared) Paused() time.Duration { return s.fallback.Paused() }

// Factor is the part of the rate in force (1 unless throttling cut it), as
// Redis said at the last grant; the fallback's while Redis is unreachable.
func (s *Shared) Factor() float64 {
	if s.offline() {
		return s.fallback.Factor()
	}
	return float64(s.factor.Load()) / 1000
}
