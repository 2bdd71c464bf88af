// Package batcher merges single-account lookups into multi-account
// portrait_get calls under the app's quota.
//
// The upstream charges one unit of quota per call, whatever it carries (up
// to 100 accounts, any tags). So a batch leaves when it is full, or when its
// window has passed and the limiter grants a token; while it waits for the
// token it keeps filling. At low load a lookup waits about one window; under
// load every call carries MaxAccounts accounts and throughput approaches
// rate × MaxAccounts lookups per second.
//
// Lookups of the same account that are queued together share one slot. A
// call fetches the union of the tags its accounts were asked for plus
// DefaultTags; each lookup gets the whole fetched item and picks its tags.
//
// Outcomes are mapped per account: a found account or a per-account failure
// is delivered as the upstream's item; a whole call refused because of what
// one caller asked for (a tag that does not exist or may not be read, an
// account that does not exist or cannot be read) is split until only the
// callers who asked for it get the refusal (see isolate.go); an account
// without data of one tag class (40807/40809) answers only the callers who
// asked for a tag of that class, the others are asked again without it;
// throttled calls are retried after a backoff and transient failures a few
// times, while their callers still wait.
//
// Background refreshes (see LoadOptions.Background) ride only in the space the
// foreground lookups leave: they wait in a queue of their own, fill a call
// the foreground accounts do not fill, are not counted by Admit, are the
// first shed when the queue is at MaxQueue, and go alone in a call only
// while the quota is not the limit. A foreground lookup of an account
// queued for a refresh takes the refresh's place at the front (Promote).
//
// The shared calls run detached from any caller's context: one caller giving
// up never cancels others' work, and accounts whose every caller has left
// before dispatch are dropped from the batch. A Batcher is safe for
// concurrent use; Run owns its goroutines.
package batcher

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptrace"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// Upstream is the call the batcher makes.
type Upstream interface {
	PortraitGet(ctx context.Context, req im.GetRequest) (*im.GetResponse, error)
}

// Limiter is the quota the batcher's calls go through; limiter.Local and
// limiter.Shared implement it.
type Limiter interface {
	// Acquire blocks until a call may start (see limiter.Limiter).
	Acquire(ctx context.Context) (*limiter.Permit, error)
	// Throttled is told when the upstream said "too frequent": the limiter
	// pauses grants for pause and lowers its rate for a while.
	Throttled(pause time.Duration)
	// Factor is the part of Rate in force now (1 unless throttling cut it).
	Factor() float64
	// Paused is how much is left of the pause Throttled asked for.
	Paused() time.Duration
	// Rate is the quota in calls per second, for Admit's estimate of the
	// wait ahead; zero or less disables the estimate.
	Rate() float64
}

// Errors returned by Load.
var (
	// ErrClosed: the batcher is shutting down or its drain time ran out.
	ErrClosed = errors.New("batcher: closed")
	// ErrMissing: the upstream's answer did not mention the account.
	ErrMissing = errors.New("batcher: account missing from upstream answer")
	// ErrOverloaded: MaxQueue accounts already wait for the quota.
	ErrOverloaded = errors.New("batcher: overloaded: too many lookups wait for the upstream quota")
	// ErrWouldMiss: the queue ahead cannot be served before the deadline.
	ErrWouldMiss = errors.New("batcher: the upstream quota cannot serve this lookup before its deadline")
)

// Defaults of Config, exported for the flags that show them.
const (
	DefaultMaxAccounts  = im.MaxAccountsPerCall // Config.MaxAccounts
	DefaultWindow       = 2 * time.Millisecond  // Config.Window
	DefaultFillHold     = 40 * time.Millisecond // Config.FillHold
	DefaultMaxQueue     = 50_000                // Config.MaxQueue
	DefaultDrainTimeout = 5 * time.Second       // Config.DrainTimeout
	DefaultRejectTTL    = 30 * time.Second      // Config.RejectTTL
)

// Config configures a Batcher. Upstream and Limiter are required.
type Config struct {
	Upstream Upstream
	Limiter  Limiter
	// MaxAccounts per call. Zero means DefaultMaxAccounts (100, the most
	// the upstream takes); more is an error.
	MaxAccounts int
	// Window is the longest a batch waits for company once a token is free.
	// Zero means DefaultWindow (2ms); negative means none.
	Window time.Duration
	// FillHold is, while the quota is the limit (the last grant had to wait
	// for a slot in the quota's window), the longest a batch that is not
	// full holds off asking for a grant, so that the quota's calls leave full — with several
	// replicas on one quota, a replica whose batch is not full leaves the
	// grant to one whose batch is. It holds no longer than the batch takes
	// to fill at the pace its accounts arrived. Zero means DefaultFillHold
	// (40ms); negative means never.
	FillHold time.Duration
	// DefaultTags are fetched with every call, so later lookups for them hit
	// the cache.
	DefaultTags []string
	// MaxAttempts bounds calls per account for transient failures
	// (transport, HTTP status, 40006-like codes). Zero means 3.
	MaxAttempts int
	// MaxThrottled bounds calls per account answered "too frequent". Zero
	// means 20; callers' deadlines usually end the retries first.
	MaxThrottled int
	// ThrottleBackoff pauses the limiter after a throttling answer (which
	// also lowers its rate for a while, see limiter.Cut); after 70050 the
	// pause is im.SigFailureRetryAfter. Zero means 500ms.
	ThrottleBackoff time.Duration
	// DrainTimeout bounds the final flush when Run's context ends. Zero
	// means DefaultDrainTimeout (5s).
	DrainTimeout time.Duration
	// MaxQueue bounds accounts waiting for a call; a lookup beyond it is
	// refused at once (ErrOverloaded). Zero means DefaultMaxQueue (50,000).
	MaxQueue int
	// Tags, if set, learns the tags the upstream refuses (see isolate);
	// known ones are left out of DefaultTags.
	Tags TagLearner
	// RejectTTL is how long an account the upstream refused a whole call
	// for (60015, 40001, once isolated) is refused again at once for the
	// same tags, so repeating the request does not cost the isolation
	// again. Zero means DefaultRejectTTL (30s); negative means never.
	RejectTTL time.Duration
	// Metrics, if nil, go to a private registry.
	Metrics *metrics.Metrics
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// LoadOptions are what a Load may say beyond its account and tags. The
// zero value is a plain foreground lookup bounded by its context.
type LoadOptions struct {
	// Deadline, if set, tells the latest deadline among the callers the
	// lookup serves (false: some caller has none), in place of the
	// context's: the batcher drops an account at dispatch when that
	// deadline cannot be met, so quota is not spent on answers nobody will
	// read. A shared lookup (the cache's flight) runs under a context with
	// no deadline of its own while its callers come and go. It is called
	// under the batcher's lock: it must not block nor take a lock that
	// is held while calling into the batcher.
	Deadline func() (time.Time, bool)
	// Background, if set, marks the lookup as a background refresh for as
	// long as it returns true: such a lookup never takes a grant or a
	// queue place a foreground lookup needs (see Batcher). It is asked
	// once, when the lookup is queued, under the batcher's lock (the same
	// rules as Deadline); a lookup that stops being background after that
	// is moved with Promote.
	Background func() bool
	// Reservation, if set, holds the lookup's place in the queue (see
	// Reserve); a background lookup takes none.
	Reservation *Reservation
}

// Result is one account's answer: the upstream's item (every fetched tag it
// returned, or a non-zero ResultCode) and the TagList that was fetched, so a
// cache can tell an unset tag from one not asked for.
type Result struct {
	Item im.UserProfile
	Tags []string
	// Sent is when the call that answered was sent: the answer reflects
	// the upstream's data at Sent or later (the cache orders writes by it).
	Sent time.Time
}

type outcome struct {
	res Result
	err error
}

type waiter struct {
	ctx      context.Context
	deadline func() (time.Time, bool) // LoadOptions.Deadline; nil: ctx's
	tags     []string                 // what this caller asked for (isolation splits by it)
	done     chan outcome             // buffered 1: completed exactly once
}

// until is the latest time w's answer is still wanted (false: none).
func (w *waiter) until() (time.Time, bool) {
	if w.deadline != nil {
		return w.deadline()
	}
	return w.ctx.Deadline()
}

type entry struct {
	account   string
	tags      []string
	waiters   []*waiter
	queued    time.Time
	attempts  int // calls made, transient failures
	throttled int // calls answered "too frequent"
	asked     int // calls asked again for callers a "no data of this class" item did not concern
	// bg: queued for background refreshes only, in bgQueue. An entry in
	// bgQueue with bg false was promoted to the foreground queue: skipped.
	bg bool
}

// newEntry is an entry with its first waiter and room for it in waiters,
// in one allocation: most accounts have one caller.
type newEntry struct {
	entry
	first waiter
	slot  [1]*waiter
}

func (e *entry) addTags(tags []string) {
	for _, t := range tags {
		if !slices.Contains(e.tags, t) {
			e.tags = append(e.tags, t)
		}
	}
}

// live drops waiters who left and reports whether any remain.
func (e *entry) live() bool {
	e.waiters = slices.DeleteFunc(e.waiters, func(w *waiter) bool { return w.ctx.Err() != nil })
	return len(e.waiters) > 0
}

// hopeless answers ErrWouldMiss to waiters whose deadline falls before a
// call started at now could answer (after lat), and reports whether none
// is left.
func (e *entry) hopeless(now time.Time, lat time.Duration) bool {
	e.waiters = slices.DeleteFunc(e.waiters, func(w *waiter) bool {
		if d, ok := w.until(); ok && d.Before(now.Add(lat)) {
			w.done <- outcome{err: ErrWouldMiss}
			return true
		}
		return false
	})
	return len(e.waiters) == 0
}

func (e *entry) complete(o outcome) {
	for _, w := range e.waiters {
		w.done <- o
	}
	e.waiters = nil
}

// Batcher is the coalescer. Create it with New and start Run.
type Batcher struct {
	cfg Config
	m   *metrics.Metrics
	now func() time.Time

	wake        chan struct{} // poked on every change; capacity 1
	windowTimer *time.Timer   // waitWindow's, only used by Run's goroutine

	mu      sync.Mutex
	pending map[string]*entry // queued and not yet dispatched, by account
	queue   []*entry          // FIFO of pending foreground accounts
	ready   []formed          // formed batches to send first (retries, split halves)
	queued  int               // accounts in queue and ready
	bgQueue []*entry          // FIFO of pending background refreshes (and promoted leftovers)
	bgN     int               // entries in bgQueue still background
	// reserved: places Reserve holds for accounts not queued yet
	reserved int
	closed   bool
	granted  time.Time // when the last grant came

	rejected rejections

	callCtx   context.Context
	inflight  sync.WaitGroup
	latency   atomic.Int64 // moving average of call duration, ns
	contended atomic.Bool  // the last grant had to wait for the quota's window
}

// New validates cfg and returns a Batcher. Nothing runs until Run.
func New(cfg Config) (*Batcher, error) {
	if cfg.Upstream == nil || cfg.Limiter == nil {
		return nil, errors.New("batcher: Config.Upstream and Config.Limiter are required")
	}
	if cfg.MaxAccounts == 0 {
		cfg.MaxAccounts = DefaultMaxAccounts
	}
	if cfg.MaxAccounts < 0 || cfg.MaxAccounts > im.MaxAccountsPerCall {
		return nil, fmt.Errorf("batcher: MaxAccounts %d not in 1..%d", cfg.MaxAccounts, im.MaxAccountsPerCall)
	}
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if cfg.FillHold == 0 {
		cfg.FillHold = DefaultFillHold
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 3
	}
	if cfg.MaxThrottled <= 0 {
		cfg.MaxThrottled = 20
	}
	if cfg.ThrottleBackoff <= 0 {
		cfg.ThrottleBackoff = 500 * time.Millisecond
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = DefaultMaxQueue
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = DefaultDrainTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.RejectTTL == 0 {
		cfg.RejectTTL = DefaultRejectTTL
	}
	m := cfg.Metrics
	if m == nil {
		m = metrics.New(prometheusRegistry())
	}
	return &Batcher{
		cfg:     cfg,
		m:       m,
		now:     cfg.Now,
		wake:    make(chan struct{}, 1),
		pending: map[string]*entry{},
		callCtx: context.Background(),
	}, nil
}

func (b *Batcher) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// Load queues account for the next batch and waits for its answer. tags are
// the tags this caller needs; the Result may hold more. Load returns ctx's
// error if ctx ends first (the batch goes on for others), ErrClosed after
// shutdown, and otherwise the call's error when no per-account answer
// could be had (an *upstream.Error, ErrMissing).
func (b *Batcher) Load(ctx context.Context, account string, tags []string) (Result, error) {
	return b.LoadWith(ctx, account, tags, LoadOptions{})
}

// LoadWith is Load for a lookup that says more (see LoadOptions): a shared
// one's deadline, a background refresh, a reserved place.
func (b *Batcher) LoadWith(ctx context.Context, account string, tags []string, opt LoadOptions) (Result, error) {
	if err := b.rejected.get(account, tags, b.now()); err != nil {
		return Result{}, err
	}
	done := make(chan outcome, 1)
	var w *waiter
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return Result{}, ErrClosed
	}
	bg := opt.Background != nil && opt.Background()
	reserved := false
	if opt.Reservation != nil && !bg {
		reserved = opt.Reservation.take()
	}
	e := b.pending[account]
	if e != nil && e.bg && !bg {
		b.promote(e)
	}
	if e == nil {
		if err := b.room(bg, reserved); err != nil {
			b.mu.Unlock()
			if bg {
				b.m.RefreshShed.Inc()
			}
			return Result{}, err
		}
		ne := &newEntry{entry: entry{account: account, queued: b.now(), bg: bg}}
		e, w = &ne.entry, &ne.first
		e.waiters = ne.slot[:0]
		b.pending[account] = e
		if bg {
			b.bgQueue = append(b.bgQueue, e)
			b.bgN++
		} else {
			b.queue = append(b.queue, e)
			b.queued++
		}
		b.m.QueueAccounts.Set(float64(b.queued + b.bgN))
	}
	if w == nil {
		w = &waiter{}
	}
	*w = waiter{ctx: ctx, deadline: opt.Deadline, tags: tags, done: done}
	e.addTags(tags)
	e.waiters = append(e.waiters, w)
	b.mu.Unlock()
	b.poke()
	select {
	case o := <-w.done:
		return o.res, o.err
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// room makes a place for a new entry (bg: a background refresh; reserved:
// its place was held by Reserve) within MaxQueue, shedding the oldest
// background refreshes for a foreground one; ErrOverloaded when there is
// none. b.mu is held.
func (b *Batcher) room(bg, reserved bool) error {
	if !reserved && b.queued+b.reserved >= b.cfg.MaxQueue {
		return ErrOverloaded
	}
	for b.queued+b.reserved+b.bgN >= b.cfg.MaxQueue {
		i := slices.IndexFunc(b.bgQueue, func(e *entry) bool { return e.bg })
		if i < 0 {
			break
		}
		e := b.bgQueue[i]
		if bg && e.live() {
			return ErrOverloaded // refreshes wait their turn; misses shed them
		}
		clear(b.bgQueue[:i+1])
		b.bgQueue = b.bgQueue[i+1:]
		b.bgN--
		delete(b.pending, e.account)
		if len(e.waiters) > 0 {
			b.m.RefreshShed.Inc()
		}
		e.complete(outcome{err: ErrOverloaded})
	}
	return nil
}

// promote moves a background entry to the back of the foreground queue; it
// stays in bgQueue as a skipped leftover. b.mu is held.
func (b *Batcher) promote(e *entry) {
	e.bg = false
	b.bgN--
	b.queue = append(b.queue, e)
	b.queued++
	b.m.QueueAccounts.Set(float64(b.queued + b.bgN))
}

// Promote makes account's queued lookup, if it is waiting as a background
// refresh, a foreground one: for a foreground caller who joined it without
// a Load of its own (the cache's singleflight).
func (b *Batcher) Promote(account string) {
	b.mu.Lock()
	if e := b.pending[account]; e != nil && e.bg {
		b.promote(e)
	}
	b.mu.Unlock()
	b.poke()
}

// Admit says whether a new lookup with this deadline can be served in
// time, given the accounts queued ahead, the quota and the recent call
// latency (background refreshes are not counted: they only fill calls):
// ErrOverloaded when the queue is full, ErrWouldMiss when the
// estimate passes the deadline, nil otherwise (or when no deadline is set).
// It lets callers answer at once (with a stale value, say) instead of
// queueing a lookup to die.
func (b *Batcher) Admit(deadline time.Time, ok bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.admit(1, deadline, ok)
}

// admit is Admit for n accounts, b.mu held: the last of them must be
// answered by deadline behind every account queued or reserved ahead.
func (b *Batcher) admit(n int, deadline time.Time, ok bool) error {
	ahead := b.queued + b.reserved
	if ahead+n > b.cfg.MaxQueue {
		return ErrOverloaded
	}
	rate := b.cfg.Limiter.Rate()
	if !ok || rate <= 0 {
		return nil
	}
	// Calls until the last of the n has left, at the rate the window
	// allows: Rate per (1s + latency), cut after throttling, behind a pause
	// in force; its answer comes a latency later.
	lat := time.Duration(b.latency.Load())
	calls := float64((ahead + n + b.cfg.MaxAccounts - 1) / b.cfg.MaxAccounts)
	eta := time.Duration(calls/(rate*b.cfg.Limiter.Factor())*float64(time.Second+lat)) + lat
	// A quarter more: calls' latency varies and the answer must still be
	// written; a request admitted at the edge would be answered in part.
	// With an eighth, 3x overload (3,000 callers x 10 new accounts, 1 s
	// deadline) left 5-10 of ~30,000 requests partly failed on 2 cores;
	// with a quarter, none, and the same rate in complete requests (the
	// queue still holds far more than a call's worth).
	eta += eta / 4
	eta += b.cfg.Limiter.Paused() // known: no margin on it
	if b.now().Add(eta).After(deadline) {
		return ErrWouldMiss
	}
	return nil
}

// Reservation holds places in the queue for the accounts of one request,
// admitted whole by Reserve. A foreground LoadWith given it
// (LoadOptions.Reservation) takes one place; Release gives back the places
// not taken. A Reservation is safe for concurrent use.
type Reservation struct {
	b    *Batcher
	left int // guarded by b.mu
}

// take uses one of r's places, if any is left; b.mu is held.
func (r *Reservation) take() bool {
	if r.left == 0 {
		return false
	}
	r.left--
	r.b.reserved--
	return true
}

// Release gives back the places not taken (an account that needed no Load
// of its own, a request that ended). Later calls do nothing.
func (r *Reservation) Release() {
	r.b.mu.Lock()
	r.b.reserved -= r.left
	r.left = 0
	r.b.mu.Unlock()
}

// Reserve admits a request's n missed accounts whole or refuses them whole,
// on arrival: with the accounts queued and reserved ahead, the last of the
// n must be answered by deadline (ErrWouldMiss otherwise) and fit within
// MaxQueue (ErrOverloaded). Admitted, the n places are held, so requests
// admitted at the same time do not each count on the same quota, until
// their Loads (LoadOptions.Reservation) take them or Release. A refused
// request's accounts never enter a batch.
func (b *Batcher) Reserve(n int, deadline time.Time, ok bool) (*Reservation, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	if err := b.admit(n, deadline, ok); err != nil {
		return nil, err
	}
	b.reserved += n
	return &Reservation{b: b, left: n}, nil
}

// Run dispatches batches until ctx ends, then flushes what is queued (within
// DrainTimeout, still under the limiter), waits for calls in flight and
// returns nil. Loads after ctx ends fail with ErrClosed; so do lookups the
// flush could not send in time. Run must be called once.
func (b *Batcher) Run(ctx context.Context) error {
	b.callCtx = context.WithoutCancel(ctx)
	for b.waitWork(ctx) {
		b.waitWindow(ctx)
		if !b.dispatch(ctx) {
			break
		}
	}
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()

	drain, cancel := context.WithTimeout(context.WithoutCancel(ctx), b.cfg.DrainTimeout)
	defer cancel()
	for {
		for b.hasWork() && b.dispatch(drain) {
		}
		b.inflight.Wait() // calls in flight may queue retries: flush those too
		if !b.hasWork() || drain.Err() != nil {
			break
		}
	}
	b.failAll(ErrClosed)
	return nil
}

func (b *Batcher) hasWork() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.queued+b.bgN > 0
}

// waitWork blocks until something is queued; false when ctx ends first.
func (b *Batcher) waitWork(ctx context.Context) bool {
	for {
		if b.hasWork() {
			return true
		}
		select {
		case <-b.wake:
		case <-ctx.Done():
			return false
		}
	}
}

// bgAloneAfter is how long after a contended grant a batch of background
// refreshes alone may ask for one: a quota's window (one second) with no
// foreground grant means the quota has room again.
const bgAloneAfter = time.Second

// waitWindow blocks until a batch should try for a token: a ready batch or
// a full queue go at once; otherwise the oldest foreground account's window
// must pass. Background refreshes fill a batch but start one alone only
// while the quota is not the limit.
func (b *Batcher) waitWindow(ctx context.Context) {
	for {
		b.mu.Lock()
		n := len(b.queue) + b.bgN
		if len(b.ready) > 0 || n >= b.cfg.MaxAccounts || n == 0 {
			b.mu.Unlock()
			return
		}
		// An idle Go runtime sleeps in epoll with millisecond granularity,
		// so timers fire up to a millisecond late. Aim early by up to half
		// the window (at most 1ms): Window is the longest wait, not the
		// shortest.
		now := b.now()
		var left time.Duration
		if len(b.queue) > 0 {
			left = b.queue[0].queued.Add(b.cfg.Window - min(b.cfg.Window/2, time.Millisecond)).Sub(now)
			if b.contended.Load() {
				left = max(left, fillWait(now.Sub(b.queue[0].queued), n, b.cfg.MaxAccounts, b.cfg.FillHold))
			}
		} else {
			first := b.bgQueue[slices.IndexFunc(b.bgQueue, func(e *entry) bool { return e.bg })]
			left = first.queued.Add(b.cfg.Window - min(b.cfg.Window/2, time.Millisecond)).Sub(now)
			if b.contended.Load() {
				left = max(left, b.granted.Add(bgAloneAfter).Sub(now))
			}
		}
		b.mu.Unlock()
		if left <= 0 {
			return
		}
		// One timer for every wait: each Load pokes this loop while a
		// batch fills, and a new timer per poke is an allocation and a
		// timer-heap insertion per lookup.
		if b.windowTimer == nil {
			b.windowTimer = time.NewTimer(left)
		} else {
			b.windowTimer.Reset(left)
		}
		select {
		case <-b.windowTimer.C:
			return
		case <-b.wake:
			b.windowTimer.Stop()
		case <-ctx.Done():
			b.windowTimer.Stop()
			return
		}
	}
}

// fillWait is how much longer a batch of queued accounts, the oldest of
// them age old, should wait before asking for a contended grant: until it
// is full, if at the pace its accounts came in it fills within hold; not at
// all otherwise (at lower rates holding would add latency and still leave
// it part empty).
func fillWait(age time.Duration, queued, maxAccounts int, hold time.Duration) time.Duration {
	if hold <= 0 || queued == 0 || queued >= maxAccounts {
		return 0
	}
	full := time.Duration(int64(age) * int64(maxAccounts) / int64(queued))
	if full > hold {
		return 0
	}
	return full - age
}

// dispatch takes a token, forms a batch and sends it; false when the token
// wait ended with ctx.
func (b *Batcher) dispatch(ctx context.Context) bool {
	start := b.now()
	permit, err := b.cfg.Limiter.Acquire(ctx)
	if err != nil {
		return false
	}
	now := b.now()
	b.m.LimiterWait.Observe(now.Sub(start).Seconds())
	b.contended.Store(permit.Scarce() || now.Sub(start) > time.Millisecond)
	b.mu.Lock()
	b.granted = now
	b.mu.Unlock()
	batch, form := b.take()
	if len(batch) == 0 {
		permit.Cancel() // everyone left while we waited: the token goes back
		return true
	}
	oldest := batch[0].queued
	for _, e := range batch {
		if e.queued.Before(oldest) {
			oldest = e.queued
		}
	}
	b.m.BatchWait.Observe(now.Sub(oldest).Seconds())
	b.m.BatchAccounts.Observe(float64(len(batch)))
	b.inflight.Add(1)
	go b.send(batch, form, permit)
	return true
}

// take removes the next batch: a ready one first, else up to MaxAccounts
// queued foreground accounts, filled up with background ones. Accounts
// whose callers all left are dropped.
func (b *Batcher) take() ([]*entry, formed) {
	b.mu.Lock()
	defer b.mu.Unlock()
	defer func() { b.m.QueueAccounts.Set(float64(b.queued + b.bgN)) }()
	for len(b.ready) > 0 {
		f := b.ready[0]
		b.ready = b.ready[1:]
		b.queued -= len(f.entries)
		batch := slices.DeleteFunc(f.entries, func(e *entry) bool { return !e.live() })
		if len(batch) > 0 {
			return batch, f
		}
		if len(f.rest)+len(f.suspect) > 0 { // a probe whose callers left: the others are asked
			o := b.orphaned(f)
			b.ready = append([]formed{o}, b.ready...)
			b.queued += len(o.entries)
		}
	}
	batch := make([]*entry, 0, b.cfg.MaxAccounts)
	n := 0
	now, lat := b.now(), time.Duration(b.latency.Load())
	for n < len(b.queue) && len(batch) < b.cfg.MaxAccounts {
		e := b.queue[n]
		n++
		delete(b.pending, e.account)
		if e.live() && !e.hopeless(now, lat) {
			batch = append(batch, e)
		}
	}
	clear(b.queue[:n])
	b.queue = b.queue[n:]
	b.queued -= n
	n = 0
	for n < len(b.bgQueue) && len(batch) < b.cfg.MaxAccounts {
		e := b.bgQueue[n]
		n++
		if !e.bg {
			continue // promoted: taken from the foreground queue
		}
		e.bg = false // leaves the queue: answers like any other entry
		b.bgN--
		delete(b.pending, e.account)
		if e.live() && !e.hopeless(now, lat) {
			batch = append(batch, e)
		}
	}
	clear(b.bgQueue[:n])
	b.bgQueue = b.bgQueue[n:]
	return batch, formed{}
}

// tagsFor is the TagList of a call for batch: its callers' tags, after
// DefaultTags unless the batch is bare, leaving out default tags the
// upstream is known to refuse.
func (b *Batcher) tagsFor(batch []*entry, bare bool) []string {
	var tags []string
	if !bare {
		tags = slices.DeleteFunc(slices.Clone(b.cfg.DefaultTags), b.refused)
	}
	for _, e := range batch {
		for _, t := range e.tags {
			if !slices.Contains(tags, t) {
				tags = append(tags, t)
			}
		}
	}
	return tags
}

// send makes one call for batch and settles every entry: answered,
// requeued for a retry, or failed.
func (b *Batcher) send(batch []*entry, form formed, permit *limiter.Permit) {
	defer b.inflight.Done()
	tags := b.tagsFor(batch, form.bare)
	if len(tags) > im.MaxTagsPerCall {
		// The callers' tags together are more than one call may carry: send
		// them in parts (each caller's own list is within the limit).
		permit.Cancel()
		if !b.isolate(batch, form, nil, true, false) {
			b.refuse(batch, &upstream.Error{Kind: im.KindRejected, Code: im.CodeBadRequest,
				Info: fmt.Sprintf("TagList has more than %d tags", im.MaxTagsPerCall)}, true, false)
		}
		return
	}
	if form.cause != "" {
		b.m.IsolationCalls.WithLabelValues(form.cause).Inc()
	}
	accounts := make([]string, len(batch))
	for i, e := range batch {
		accounts[i] = e.account
	}
	// The upstream counted the call by the time its first answer byte is
	// back: the permit ends there, before the body is read and decoded, so
	// the limiter's window is not held open by our own processing.
	ctx := httptrace.WithClientTrace(b.callCtx, &httptrace.ClientTrace{GotFirstResponseByte: permit.Done})
	start := time.Now()
	resp, err := b.cfg.Upstream.PortraitGet(ctx, im.GetRequest{ToAccount: accounts, TagList: tags})
	permit.Done() // no answer at all: the call ends with its failure
	d := int64(time.Since(start))
	old := b.latency.Load()
	b.latency.Store(old + (d-old)/5) // a moving average; a lost race only skips one sample
	if err == nil {
		if form.blamed != nil {
			b.blameDefaults(form.blamed)
		}
		b.deliver(batch, form, tags, resp, start)
		b.probed(form)
		return
	}
	var ue *upstream.Error
	errors.As(err, &ue)
	switch kind := upstream.KindOf(err); {
	case kind == im.KindThrottled:
		b.cfg.Limiter.Throttled(upstream.ThrottlePause(err, b.cfg.ThrottleBackoff))
		b.retry(batch, form, err, "throttled")
	case kind == im.KindNotFound && len(batch) > 1:
		// One bad account failed the whole call: halve until it stands alone.
		b.isolate(batch, form, ue, false, true)
	case kind == im.KindNotFound:
		// The account stands alone: its answer is the refusal, as an item.
		e := batch[0]
		b.deliver(batch, form, tags, &im.GetResponse{UserProfileItem: []im.UserProfile{{
			ToAccount: e.account, ProfileItem: []im.ProfileItem{}, ResultCode: ue.Code, ResultInfo: ue.Info}}}, start)
		b.probed(form)
	case ue != nil && ue.Code == im.CodeBadRequest && len(form.rest) > 0 && form.suspect == nil && b.spend(batch, &form, 1, true):
		// A probe refused alone as its whole batch was: the account or the
		// tags. Another account alone tells.
		b.m.UpstreamRetries.WithLabelValues("split").Add(1)
		b.requeueReady(formed{entries: form.rest[:1:1], rest: form.rest[1:], suspect: batch, suspectErr: ue,
			bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget})
	case ue != nil && ue.Code == im.CodeBadRequest && (len(form.rest) > 0 || len(form.suspect) > 0):
		// Two accounts refused alone as their whole batch was: the tags are
		// the cause.
		b.refuse(slices.Concat(form.suspect, batch, form.rest), ue, true, false)
	case ue != nil && isolable(ue.Code):
		// Something one caller asked for refused the whole call: split until
		// only the callers who asked for it get the refusal.
		byTags, byAccounts := blames(ue.Code)
		if !b.isolate(batch, form, ue, byTags, byAccounts) {
			b.refuse(batch, ue, byTags, byAccounts)
		}
		b.probed(form)
	case kind == im.KindAuth || kind == im.KindRejected:
		for _, e := range slices.Concat(form.suspect, batch, form.rest) {
			e.complete(outcome{err: err})
		}
	default: // transport, HTTP status, transient codes
		b.retry(batch, form, err, "transient")
	}
}

// retry queues batch again as a formed batch, keeping the entries whose
// callers still wait and who have attempts left; the rest get err.
func (b *Batcher) retry(batch []*entry, form formed, err error, reason string) {
	var again []*entry
	for _, e := range batch {
		var left bool
		if reason == "throttled" {
			e.throttled++
			left = e.throttled < b.cfg.MaxThrottled
		} else {
			e.attempts++
			left = e.attempts < b.cfg.MaxAttempts
		}
		if left && e.live() {
			again = append(again, e)
		} else {
			e.complete(outcome{err: err})
		}
	}
	if len(again) == 0 {
		if len(form.rest)+len(form.suspect) > 0 {
			b.requeueReady(b.orphaned(form))
		}
		return
	}
	b.m.UpstreamRetries.WithLabelValues(reason).Add(float64(len(again)))
	f := form
	f.entries = again
	b.requeueReady(f)
}

// requeueReady puts formed batches at the front of the ready list.
func (b *Batcher) requeueReady(batches ...formed) {
	b.mu.Lock()
	for _, bt := range batches {
		b.queued += len(bt.entries)
	}
	b.ready = append(slices.Clone(batches), b.ready...)
	b.m.QueueAccounts.Set(float64(b.queued + b.bgN))
	b.mu.Unlock()
	b.poke()
}

// deliver hands each entry its item. A per-account transient failure is
// queued again (it rides along with the next batch) while attempts remain.
func (b *Batcher) deliver(batch []*entry, form formed, tags []string, resp *im.GetResponse, sent time.Time) {
	items := resp.UserProfileItem
	var byAccount map[string]int
	find := func(i int, account string) (im.UserProfile, bool) {
		if i < len(items) && items[i].ToAccount == account {
			return items[i], true // the usual case: answers in request order
		}
		if byAccount == nil {
			byAccount = make(map[string]int, len(items))
			for j, it := range items {
				byAccount[it.ToAccount] = j
			}
		}
		j, ok := byAccount[account]
		if !ok {
			return im.UserProfile{}, false
		}
		return items[j], true
	}
	var again []*entry
	var askStd, askCustom []*entry // callers an account's "no data" item does not concern
	for i, e := range batch {
		item, ok := find(i, e.account)
		switch {
		case !ok:
			e.attempts++
			if e.attempts < b.cfg.MaxAttempts && e.live() {
				again = append(again, e)
			} else {
				e.complete(outcome{err: ErrMissing})
			}
		case item.ResultCode != 0 && im.Classify(item.ResultCode) == im.KindTransient:
			e.attempts++
			if e.attempts < b.cfg.MaxAttempts && e.live() {
				again = append(again, e)
			} else {
				e.complete(outcome{res: Result{Item: item, Tags: tags, Sent: sent}})
			}
		case im.NoDataClass(item.ResultCode) != 0:
			// "No standard (custom) data" answers the callers who asked for a
			// tag of that class; the others are asked again without it.
			cls := im.NoDataClass(item.ResultCode)
			res := outcome{res: Result{Item: item, Tags: tags, Sent: sent}}
			if other := b.unconcerned(e, cls, res); other != nil {
				if cls == im.ClassStandard {
					askCustom = append(askCustom, other)
				} else {
					askStd = append(askStd, other)
				}
			}
		default:
			e.complete(outcome{res: Result{Item: item, Tags: tags, Sent: sent}})
		}
	}
	if len(again) > 0 {
		b.m.UpstreamRetries.WithLabelValues("transient").Add(float64(len(again)))
		b.requeueFront(again)
	}
	for _, ask := range [][]*entry{askStd, askCustom} {
		if len(ask) > 0 {
			b.requeueReady(formed{entries: ask, bare: true, cause: metrics.IsolateClass})
		}
	}
}

// requeueFront puts entries back at the head of the queue, merging each
// with a newer entry for the same account if one is pending.
func (b *Batcher) requeueFront(entries []*entry) {
	b.mu.Lock()
	var front []*entry
	for _, e := range entries {
		if cur := b.pending[e.account]; cur != nil {
			cur.addTags(e.tags)
			cur.waiters = append(cur.waiters, e.waiters...)
			cur.attempts = max(cur.attempts, e.attempts)
			continue
		}
		b.pending[e.account] = e
		front = append(front, e)
	}
	b.queue = append(front, b.queue...)
	b.queued += len(front)
	b.m.QueueAccounts.Set(float64(b.queued + b.bgN))
	b.mu.Unlock()
	b.poke()
}

// failAll answers everything still queued with err.
func (b *Batcher) failAll(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, bt := range b.ready {
		for _, e := range slices.Concat(bt.suspect, bt.entries, bt.rest) {
			e.complete(outcome{err: err})
		}
	}
	for _, e := range b.queue {
		e.complete(outcome{err: err})
	}
	for _, e := range b.bgQueue {
		if e.bg { // the others were promoted: answered through the foreground queue
			e.complete(outcome{err: err})
		}
	}
	b.ready, b.queue, b.queued, b.bgQueue, b.bgN = nil, nil, 0, nil, 0
	clear(b.pending)
	b.m.QueueAccounts.Set(0)
}
