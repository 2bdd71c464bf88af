// Package cache answers profile lookups from cached account+tag entries and
// loads what is missing.
//
// A lookup goes: the in-process tier (Local) → the shared tier (Remote,
// e.g. the Redis tier of cache/redistier: one round trip for the whole
// request) → for each account still missing, one singleflight per account
// and tag set → the Loader (the batcher) → results written back to both
// tiers → every waiter answered from the same result.
//
// Three kinds of entry are kept: fresh values (TTL), values servable past
// fresh (StaleTTL: served while one background refresh runs, and whenever
// the upstream fails), and negative entries (NegativeTTL): account-wide for
// accounts that do not exist, per tag class for accounts holding no data of
// one class (40807/40809, see nodata.go). Transient failures are never
// cached. A tag the upstream did not return is cached as unset.
//
// A Cache is safe for concurrent use. Background refreshes are owned by the
// Cache: Close waits for them.
package cache

import (
	"context"
	"errors"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Remote is a shared tier behind Local. Get answers for all accounts in one
// round trip (nil where it holds nothing); Put writes records, merging with
// what is there. Errors mean the tier is unusable for now: the Cache goes
// on without it.
type Remote interface {
	Get(ctx context.Context, accounts, tags []string) ([]*Record, error)
	Put(ctx context.Context, accounts []string, recs []*Record) error
}

// Coordinator lets replicas agree on who fetches a missed account, so an
// account missed on several replicas at once is fetched once. The Redis
// tier (cache/redistier) satisfies it.
type Coordinator interface {
	// Claim makes this replica the fetcher of account, unless another
	// replica is (owned false). It also returns the shared tier's record
	// for tags as read after the claim, so a result that landed just
	// before is not fetched again.
	Claim(ctx context.Context, account string, tags []string) (owned bool, rec *Record, err error)
	// Release gives a claim up after a failed fetch, so waiters take over.
	// A successful fetch releases with its write-back.
	Release(account string)
	// Poll reads account's record for tags and whether a claim on it is
	// still held.
	Poll(ctx context.Context, account string, tags []string) (rec *Record, claimed bool, err error)
}

// Config configures a Cache. Loader is required.
type Config struct {
	Loader Loader // see loader.go
	// Local is the in-process tier; nil means NewLocal(0).
	Local *Local
	// Remote is the shared tier; nil means none.
	Remote Remote
	// Coordinator, if set, coalesces misses across replicas (see
	// Coordinator). PollEvery is how often a replica waiting on another's
	// fetch looks for the result; zero means 5ms.
	Coordinator Coordinator
	PollEvery   time.Duration
	// TTL is how long a value is fresh. Zero means DefaultTTL (60s).
	TTL time.Duration
	// StaleTTL is how long past fresh a value may be served while it is
	// refreshed or when the upstream fails. Zero means DefaultStaleTTL (1h).
	StaleTTL time.Duration
	// NegativeTTL is how long "no such account" is remembered. Zero means
	// DefaultNegativeTTL (30s).
	NegativeTTL time.Duration
	// RefreshTimeout bounds a background refresh. Zero means
	// DefaultRefreshTimeout (10s).
	RefreshTimeout time.Duration
	// RefreshBackoff is how long after a failed background refresh the
	// same account and tags are not refreshed again (stale values keep
	// being served). Zero means DefaultRefreshBackoff (5s).
	RefreshBackoff time.Duration
	// ClockSkew is how far apart the clocks of the replicas and the
	// upstream may be (see supersedes); set the same value on the Redis
	// tier (cache/redistier). Zero means DefaultClockSkew (1s).
	ClockSkew time.Duration
	Metrics   *metrics.Metrics
	Now       func() time.Time
}

// Source says where an answer came from.
type Source string

// Sources of an Answer.
const (
	SourceLocal    Source = "local"
	SourceRemote   Source = "redis"
	SourceUpstream Source = "upstream"
	SourceStale    Source = "stale" // past fresh, served because the upstream failed
)

// Answer is one account's outcome. Item holds the requested tags that are
// set, in the order asked, or a non-zero ResultCode for a per-account
// failure. Err is set when no answer could be had (Item is then empty).
type Answer struct {
	Item   im.UserProfile
	Err    error
	Source Source
}

// Cache is the lookup path. Create it with New.
type Cache struct {
	cfg    Config
	local  *Local
	m      *metrics.Metrics
	now    func() time.Time
	sf     singleflight.Group // the only de-duplication of loads; see flight
	fmu    sync.Mutex         // guards flight; taken before sf's own lock (Forget), never after
	flight map[string]*flight // by singleflight key

	// counters of the hit path, resolved once instead of per lookup
	localHit, localStale, localMiss prometheus.Counter

	bg         sync.WaitGroup
	bgCtx      context.Context
	bgCancel   context.CancelFunc
	refreshing sync.Map // account+tags → time.Time before which no refresh starts
	sweeper    sync.WaitGroup
	changed    changeMemo
}

// changeMemo remembers when accounts last changed (newest change version,
// ms), so a fetch sent before a change cannot put the old value back into
// the in-process tier after the account's record left it (evicted, or the
// whole tier cleared after a feed cut). floor stands for every account: it
// is raised to the clear time on a clear, and to the newest version
// forgotten when the memo is emptied to stay within maxChanged accounts
// (forgetting is safe: the floor then covers those accounts, and only
// fetches sent before it are kept out of the tier; Redis still takes them,
// versioned).
type changeMemo struct {
	mu            sync.Mutex
	ver           map[string]int64
	newest, floor int64
}

const maxChanged = 65_536

func (m *changeMemo) note(account string, ver int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.ver) >= maxChanged {
		m.floor, m.ver = max(m.floor, m.newest), nil
	}
	if m.ver == nil {
		m.ver = map[string]int64{}
	}
	if ver > m.ver[account] {
		m.ver[account] = ver
	}
	m.newest = max(m.newest, ver)
}

func (m *changeMemo) raise(ver int64) {
	m.mu.Lock()
	m.floor = max(m.floor, ver)
	m.mu.Unlock()
}

// since returns the newest change version that may concern account.
func (m *changeMemo) since(account string) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return max(m.floor, m.ver[account])
}

func newestVer(rec *Record) int64 {
	v := rec.NotFoundVer
	for i := range rec.Tags {
		v = max(v, rec.Tags[i].Ver)
	}
	return v
}

// flight is the record of one singleflight call, by the same key (account
// + "\x01" + keyOf(tags)): it counts the callers waiting on the call, so
// the call's context ends when the last of them leaves (and the batcher
// drops the account if it has not been sent yet), and it merges what the
// Loader reads about those callers while it waits. It holds no result:
// singleflight is the only de-duplication.
//
// A caller joins under c.fmu (find or create the record, count in), then
// calls sf.DoChan(key) while counted in. The record ends under c.fmu when
// its count falls to zero: its context is cancelled, it is deleted and
// sf.Forget(key) drops its call from singleflight if still running. So a
// caller never joins a cancelled call: no record ends while one of its
// callers has yet to call DoChan, and when it ends its call is forgotten
// before a new record for the key can exist; every call DoChan finds was
// started by a caller of the live record, under that record's context. (A
// caller joining after the record's call returned starts a new call under
// the same live context.)
type flight struct {
	key    string
	ctx    context.Context
	cancel context.CancelFunc
	ticket Ticket // the first caller's admission, for the Loads of the flight
	refs   int    // guarded by c.fmu

	// What the Loader reads about the callers while the lookup waits, read
	// without c.fmu: the batcher reads them under its own lock, and taking
	// c.fmu there would order the two locks. Written under c.fmu.
	latest atomic.Int64 // the latest caller deadline as time.Duration after base; unbounded: some caller has none
	bg     atomic.Bool  // every caller so far is a background refresh
	// base is when the record was made. Deadlines are kept relative to it
	// (time.Time.Sub keeps the monotonic clock, so a step of the wall clock
	// does not move them, and saturates instead of overflowing: a deadline
	// centuries ahead counts as none).
	base time.Time
}

const unbounded = math.MaxInt64

// join counts a caller in: its deadline (ok false: none) and whether it
// is a background refresh. c.fmu is held.
func (f *flight) join(deadline time.Time, ok, bg bool) {
	f.refs++
	if !ok {
		f.latest.Store(unbounded)
	} else if n := int64(deadline.Sub(f.base)); n > f.latest.Load() {
		f.latest.Store(n)
	}
	if !bg {
		f.bg.Store(false)
	}
}

// deadline is Lookup.Deadline: the latest deadline among the callers.
func (f *flight) deadline() (time.Time, bool) {
	n := f.latest.Load()
	if n == unbounded {
		return time.Time{}, false
	}
	return f.base.Add(time.Duration(n)), true
}

// background is Lookup.Background: every caller is a background refresh.
func (f *flight) background() bool { return f.bg.Load() }

// New validates cfg and returns a Cache.
func New(cfg Config) (*Cache, error) {
	if cfg.Loader == nil {
		return nil, errors.New("cache: Config.Loader is required")
	}
	if cfg.Local == nil {
		cfg.Local = NewLocal(0)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.StaleTTL <= 0 {
		cfg.StaleTTL = DefaultStaleTTL
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = DefaultNegativeTTL
	}
	if cfg.RefreshTimeout <= 0 {
		cfg.RefreshTimeout = DefaultRefreshTimeout
	}
	if cfg.PollEvery <= 0 {
		cfg.PollEvery = 5 * time.Millisecond
	}
	if cfg.RefreshBackoff <= 0 {
		cfg.RefreshBackoff = DefaultRefreshBackoff
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ClockSkew <= 0 {
		cfg.ClockSkew = DefaultClockSkew
	}
	cfg.Local.skew.Store(cfg.ClockSkew.Milliseconds())
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(prometheus.NewRegistry())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cl := cfg.Metrics.CacheLookups
	c := &Cache{cfg: cfg, local: cfg.Local, m: cfg.Metrics, now: cfg.Now,
		localHit: cl.WithLabelValues("local", "hit"), localStale: cl.WithLabelValues("local", "stale"),
		localMiss: cl.WithLabelValues("local", "miss"),
		flight:    map[string]*flight{}, bgCtx: ctx, bgCancel: cancel}
	if f, ok := cfg.Remote.(Feed); ok && c.local.Enabled() {
		c.bg.Add(1)
		go func() {
			defer c.bg.Done()
			f.Follow(ctx, c.fromFeed, c.feedLost)
		}()
	}
	c.sweeper.Go(func() { c.sweepRefreshing(ctx) })
	return c, nil
}

// feedLost drops the in-process tier after a feed cut (changes may have
// been missed), and keeps fetches sent before now out of it.
func (c *Cache) feedLost() {
	c.changed.raise(c.now().UnixMilli())
	c.local.Clear()
}

// sweepRefreshing forgets, every RefreshBackoff until ctx ends, the
// refresh marks whose time has passed (failed refreshes leave one each),
// so the map holds only refreshes running or backing off.
func (c *Cache) sweepRefreshing(ctx context.Context) {
	t := time.NewTicker(c.cfg.RefreshBackoff)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := c.now()
		c.refreshing.Range(func(k, v any) bool {
			if !now.Before(v.(time.Time)) {
				c.refreshing.CompareAndDelete(k, v)
			}
			return true
		})
	}
}

// Close stops background refreshes and waits for them.
func (c *Cache) Close() {
	c.bgCancel()
	c.bg.Wait()
	c.sweeper.Wait()
}

// Get answers every account for tags, in order. It returns when every
// account is answered or ctx ends; accounts still loading then get ctx's
// error (their loads go on for other callers).
func (c *Cache) Get(ctx context.Context, accounts, tags []string) []Answer {
	now := c.now()
	answers, items := newAnswers(len(accounts), len(tags))
	// Most requests ask for a few accounts: their bookkeeping stays on the
	// stack.
	var recBuf [4]*Record
	var missBuf [4]int
	recs := recBuf[:0] // best record known, for stale serving
	if len(accounts) > len(recBuf) {
		recs = make([]*Record, len(accounts))
	}
	recs = recs[:len(accounts)]
	miss := c.getLocal(accounts, tags, answers, items, recs, missBuf[:0], now)
	if len(miss) == 0 {
		return answers
	}
	if c.cfg.Remote != nil {
		miss = c.getRemote(ctx, accounts, tags, miss, answers, recs, now)
		if len(miss) == 0 {
			return answers
		}
	}

	type pending struct {
		i  int
		ch <-chan singleflight.Result
		f  *flight
	}
	var waitBuf [4]pending
	waits := waitBuf[:0]
	tagKey := keyOf(tags)
	// Refuse at once what the quota cannot serve in time — every missed
	// account of the request, or none: a stale value if there is one, else
	// the error, instead of queueing to die or answering the request in part.
	dl, hasDL := ctx.Deadline()
	ticket, err := c.cfg.Loader.Admit(len(miss), dl, hasDL)
	if err != nil {
		c.m.Shed.Add(float64(len(miss)))
		for _, i := range miss {
			answers[i] = c.failed(accounts[i], tags, err, recs[i])
		}
		return answers
	}
	if ticket != nil {
		defer ticket.Release()
	}
	for _, i := range miss {
		f, ch := c.load(ctx, accounts[i], tags, tagKey, false, ticket)
		waits = append(waits, pending{i, ch, f})
	}
	for _, w := range waits {
		select {
		case r := <-w.ch:
			c.leave(w.f)
			answers[w.i] = c.answerLoaded(accounts[w.i], tags, r, recs[w.i])
		case <-ctx.Done():
			c.leave(w.f)
			answers[w.i] = c.failed(accounts[w.i], tags, ctx.Err(), recs[w.i])
		}
	}
	return answers
}

// getLocal answers from the in-process tier what it can (the values of
// hits appended to items), notes the records it found in recs, and returns
// the indexes of the accounts it could not answer, appended to miss.
func (c *Cache) getLocal(accounts, tags []string, answers []Answer, items []im.ProfileItem, recs []*Record, miss []int, now time.Time) []int {
	for i, a := range accounts {
		rec := c.local.Get(a, now)
		recs[i] = rec
		switch st := rec.state(tags, now); st {
		case stateFresh, stateNotFound, stateStale:
			if items == nil && st != stateNotFound { // one array for the items of every hit
				items = make([]im.ProfileItem, 0, min((len(accounts)-i)*len(tags), maxHitItems))
			}
			answers[i].Item, items = appendPick(items, a, rec, tags, now)
			answers[i].Source = SourceLocal
			if st != stateStale {
				c.localHit.Inc()
				continue
			}
			c.localStale.Inc()
			c.refresh(a, tags)
		default:
			c.localMiss.Inc()
			miss = append(miss, i)
		}
	}
	return miss
}

// getRemote looks the missing accounts up in the shared tier, fills what it
// can, and returns the indexes still missing.
func (c *Cache) getRemote(ctx context.Context, accounts, tags []string, miss []int, answers []Answer, recs []*Record, now time.Time) []int {
	names := make([]string, len(miss))
	for k, i := range miss {
		names[k] = accounts[i]
	}
	got, err := c.cfg.Remote.Get(ctx, names, tags)
	if err != nil {
		c.m.CacheLookups.WithLabelValues("redis", "error").Add(float64(len(miss)))
		return miss
	}
	still := miss[:0]
	for k, i := range miss {
		rec := c.bounded(got[k], now)
		if rec == nil {
			c.m.CacheLookups.WithLabelValues("redis", "miss").Inc()
			still = append(still, i)
			continue
		}
		// The answer comes from what this replica holds once the Redis
		// record is merged in: this replica may know of a newer value
		// (from the feed, or a change whose Redis write failed).
		st := merge(recs[i], rec, c.local.skew.Load()).state(tags, now)
		if st != stateMiss {
			if held, _ := c.local.MergeHeld(accounts[i], rec, now); held != nil {
				rec, st = held, held.state(tags, now)
			}
		}
		switch st {
		case stateFresh, stateNotFound:
			c.m.CacheLookups.WithLabelValues("redis", "hit").Inc()
			answers[i] = Answer{Item: pick(accounts[i], rec, tags, now), Source: SourceRemote}
		case stateStale:
			c.m.CacheLookups.WithLabelValues("redis", "stale").Inc()
			answers[i] = Answer{Item: pick(accounts[i], rec, tags, now), Source: SourceRemote}
			c.refresh(accounts[i], tags)
		default:
			c.m.CacheLookups.WithLabelValues("redis", "miss").Inc()
			if recs[i] == nil {
				recs[i] = rec
			}
			still = append(still, i)
		}
	}
	return still
}

func keyOf(tags []string) string {
	if len(tags) == 1 {
		return tags[0]
	}
	s := slices.Clone(tags)
	slices.Sort(s)
	return strings.Join(slices.Compact(s), "\x00")
}

// load joins (or starts) the flight for account and tags; bg says the
// caller is a background refresh. A flight only refreshes have joined is
// loaded as a background lookup (Lookup.Background), and promoted when a
// foreground caller joins it. A flight this caller starts loads with its
// ticket (nil: none).
func (c *Cache) load(caller context.Context, account string, tags []string, tagKey string, bg bool, ticket Ticket) (*flight, <-chan singleflight.Result) {
	key := account + "\x01" + tagKey
	dl, hasDL := caller.Deadline()
	promote := false
	c.fmu.Lock()
	f := c.flight[key]
	if f == nil {
		ctx, cancel := context.WithCancel(context.Background())
		f = &flight{key: key, ctx: ctx, cancel: cancel, ticket: ticket, base: time.Now()}
		f.latest.Store(math.MinInt64)
		f.bg.Store(bg)
		c.flight[key] = f
	} else {
		c.m.SingleflightShared.Inc()
		promote = f.bg.Load() && !bg
	}
	f.join(dl, hasDL, bg)
	c.fmu.Unlock()
	if promote {
		c.cfg.Loader.Promote(account)
	}
	ch := c.sf.DoChan(key, func() (any, error) { return c.fetch(f, account, tags) })
	return f, ch
}

// fetch is a flight's call: the result of another replica's fetch, or
// else the Loader's, written to both tiers.
func (c *Cache) fetch(f *flight, account string, tags []string) (Fetched, error) {
	if c.cfg.Coordinator != nil {
		if res, ok := c.fromOtherReplica(f.ctx, account, tags); ok {
			return res, nil
		}
	}
	lk := Lookup{Account: account, Tags: tags, Deadline: f.deadline, Ticket: f.ticket}
	if f.bg.Load() {
		lk.Background = f.background
	}
	start := c.now()
	res, err := c.cfg.Loader.Load(f.ctx, lk)
	if res.Sent.IsZero() {
		res.Sent = start // a loader that does not say: the earliest it could have been
	}
	if err == nil {
		c.store(account, res)
	}
	if c.cfg.Coordinator != nil && (err != nil || c.recordOf(res, c.now()) == nil) {
		c.cfg.Coordinator.Release(account) // nothing will be written: let waiters fetch
	}
	return res, err
}

// fromOtherReplica claims account; when another replica holds the claim it
// waits for that replica's result in the shared tier. ok is false when this
// replica should fetch: it holds the claim, the coordinator failed, or the
// other fetch ended without a usable result.
func (c *Cache) fromOtherReplica(ctx context.Context, account string, tags []string) (Fetched, bool) {
	owned, rec, err := c.cfg.Coordinator.Claim(ctx, account, tags)
	if err != nil {
		return Fetched{}, false
	}
	now := c.now()
	rec = c.bounded(rec, now)
	if st := rec.state(tags, now); st == stateFresh || st == stateNotFound {
		// Another replica's result landed between our tier read and the claim.
		if owned {
			c.cfg.Coordinator.Release(account)
		}
		c.m.CrossReplica.WithLabelValues("waited").Inc()
		c.local.Merge(account, rec, now)
		return Fetched{Item: pick(account, rec, tags, now), Tags: tags}, true
	}
	if owned {
		c.m.CrossReplica.WithLabelValues("claimed").Inc()
		return Fetched{}, false
	}
	t := time.NewTicker(c.cfg.PollEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return Fetched{}, false
		case <-t.C:
		}
		rec, claimed, err := c.cfg.Coordinator.Poll(ctx, account, tags)
		if err != nil {
			return Fetched{}, false
		}
		now := c.now()
		rec = c.bounded(rec, now)
		switch rec.state(tags, now) {
		case stateFresh, stateStale, stateNotFound:
			c.m.CrossReplica.WithLabelValues("waited").Inc()
			c.local.Merge(account, rec, now)
			it := pick(account, rec, tags, now)
			return Fetched{Item: it, Tags: tags}, true
		}
		if !claimed { // the other fetch failed or its claim expired: fetch here
			c.m.CrossReplica.WithLabelValues("taken_over").Inc()
			return Fetched{}, false
		}
	}
}

// leave drops one caller from f; the last one out ends the flight (see
// flight).
func (c *Cache) leave(f *flight) {
	c.fmu.Lock()
	defer c.fmu.Unlock()
	if f.refs--; f.refs == 0 {
		f.cancel()
		delete(c.flight, f.key)
		c.sf.Forget(f.key)
	}
}

// refresh reloads account's tags in the background: one refresh at a time
// per account and tag set, and none for RefreshBackoff after one failed, so
// an upstream outage does not turn every stale hit into a call.
func (c *Cache) refresh(account string, tags []string) {
	if c.bgCtx.Err() != nil {
		return
	}
	tagKey := keyOf(tags)
	k := account + "\x01" + tagKey
	now := c.now()
	if v, loaded := c.refreshing.LoadOrStore(k, now.Add(c.cfg.RefreshTimeout)); loaded {
		if now.Before(v.(time.Time)) {
			return
		}
		c.refreshing.Store(k, now.Add(c.cfg.RefreshTimeout))
	}
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		ctx, cancel := context.WithTimeout(c.bgCtx, c.cfg.RefreshTimeout)
		defer cancel()
		f, ch := c.load(ctx, account, tags, tagKey, true, nil)
		ok := false
		select {
		case r := <-ch:
			ok = r.Err == nil && im.Classify(r.Val.(Fetched).Item.ResultCode) != im.KindTransient
		case <-ctx.Done():
		}
		c.leave(f)
		if ok {
			c.refreshing.Delete(k)
		} else {
			c.refreshing.Store(k, c.now().Add(c.cfg.RefreshBackoff))
		}
	}()
}

// Change applies a profile change to both tiers and, through the shared
// tier's feed, to every replica's in-process tier, before it returns.
// origin is FromSet for a portrait_set through this proxy (at: when its
// answer came) or FromCallback for the upstream's change callback (event:
// its EventTime in Unix ms; at: when it arrived). No tier takes a value
// older than the one it holds (see supersedes), so changes may arrive late,
// twice or out of order. The error is the shared tier's: the change is then
// only here, and other replicas serve the old value until their TTL.
func (c *Cache) Change(ctx context.Context, account string, items []im.ProfileItem, origin Origin, event int64, at time.Time) error {
	now := c.now()
	fresh, stale := c.deadlines(now)
	rec := &Record{Tags: make([]TagValue, 0, len(items))}
	for _, it := range items {
		rec.put(TagValue{Tag: intern(it.Tag), Value: it.Value, Set: true, Origin: origin, Ver: at.UnixMilli(), Event: event,
			Fresh: fresh, Stale: stale})
	}
	source := metrics.ChangeSet
	if origin == FromCallback {
		source = metrics.ChangeCallback
	}
	return c.change(ctx, account, rec, source, now, false)
}

// Invalidate drops account's tags from every tier (and every replica's
// in-process tier), for a change whose value is unknown or not trusted: a
// portrait_set that got no answer (cause FromSet), a callback that carries
// no signature (FromCallback). The next lookup fetches the tags; a fetch
// sent before at can no longer store them.
func (c *Cache) Invalidate(ctx context.Context, account string, tags []string, cause Origin, at time.Time) error {
	now := c.now()
	source := metrics.ChangeSet
	if cause == FromCallback {
		source = metrics.ChangeCallback
	}
	return c.change(ctx, account, tombstones(tags, at, now), source, now, false)
}

// Drop is Invalidate for a change nothing authenticates (an unsigned
// callback): only tags already cached are dropped, in every tier and on
// every replica, and nothing is created: no Redis key, no field, no
// in-process entry, no longer key life. A forged Drop costs refetches of a
// tag that was cached: fetches sent within the clock skew after it do not
// replace it (see supersedes), so until then every lookup of the tag
// misses both tiers.
func (c *Cache) Drop(ctx context.Context, account string, tags []string, at time.Time) error {
	now := c.now()
	return c.change(ctx, account, tombstones(tags, at, now), metrics.ChangeCallback, now, true)
}

// tombstones is the record of an invalidation at at: each tag unset and
// already expired (a miss for lookups), versioned at.
func tombstones(tags []string, at, now time.Time) *Record {
	rec := &Record{Tags: make([]TagValue, 0, len(tags))}
	for _, t := range tags {
		rec.put(TagValue{Tag: intern(t), Origin: FromInvalidate, Ver: at.UnixMilli(), Fresh: now, Stale: now})
	}
	return rec
}

// isTombstones reports whether rec only drops tags (an invalidation).
func isTombstones(rec *Record) bool {
	for _, v := range rec.Tags {
		if v.Origin != FromInvalidate {
			return false
		}
	}
	return rec.NotFoundCode == 0
}

func (c *Cache) change(ctx context.Context, account string, rec *Record, source string, now time.Time, existing bool) error {
	c.changed.note(account, newestVer(rec))
	var applied bool
	if existing || isTombstones(rec) {
		// A tombstone needs no entry where nothing is cached.
		applied = c.local.MergeExisting(account, rec, now) || !c.local.Enabled()
	} else {
		applied = c.local.Merge(account, rec, now) || !c.local.Enabled()
	}
	var err error
	if c.cfg.Remote != nil {
		f, ok := c.cfg.Remote.(Feed)
		switch {
		case ok:
			err = f.Change(ctx, account, rec, existing)
		case !existing:
			err = c.cfg.Remote.Put(ctx, []string{account}, []*Record{rec})
		}
	}
	switch {
	case err != nil:
		c.m.Changes.WithLabelValues(source, metrics.ChangeUnshared).Inc()
	case applied:
		c.m.Changes.WithLabelValues(source, metrics.ChangeApplied).Inc()
	default:
		c.m.Changes.WithLabelValues(source, metrics.ChangeOld).Inc()
	}
	return err
}

// fromFeed applies a change another replica announced.
func (c *Cache) fromFeed(account string, rec *Record, sent time.Time) {
	now := c.now()
	rec = c.bounded(rec, now)
	c.changed.note(account, newestVer(rec))
	c.m.FeedDelay.Observe(max(0, time.Since(sent).Seconds()))
	var applied bool
	if isTombstones(rec) {
		applied = c.local.MergeExisting(account, rec, now)
	} else {
		applied = c.local.Merge(account, rec, now)
	}
	if applied {
		c.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied).Inc()
	} else {
		c.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeOld).Inc()
	}
}

// bounded returns rec limited to what this replica could have learned by
// now: fresh and stale deadlines to its TTLs, versions and EventTimes to
// now + the clock skew, a negative entry to NegativeTTL. A record that
// came from elsewhere (the change feed, Redis) can claim anything; bounded,
// it outranks later changes at most within the skew, and expires when a
// local one would. rec itself is returned when it claims nothing more.
func (c *Cache) bounded(rec *Record, now time.Time) *Record {
	if rec == nil {
		return nil
	}
	fresh, stale := c.deadlines(now)
	neg := now.Add(c.cfg.NegativeTTL)
	maxVer := now.Add(c.cfg.ClockSkew).UnixMilli()
	over := func(v *TagValue) bool {
		return v.Fresh.After(fresh) || v.Stale.After(stale) || v.Ver > maxVer || v.Event > maxVer
	}
	clamp := rec.NotFoundUntil.After(neg) || rec.NotFoundVer > maxVer
	for i := range rec.Tags {
		clamp = clamp || over(&rec.Tags[i])
	}
	if !clamp {
		return rec
	}
	out := &Record{NotFoundCode: rec.NotFoundCode, NotFoundInfo: rec.NotFoundInfo, NotFoundUntil: rec.NotFoundUntil,
		NotFoundVer: min(rec.NotFoundVer, maxVer), Tags: slices.Clone(rec.Tags)}
	if out.NotFoundUntil.After(neg) {
		out.NotFoundUntil = neg
	}
	for i := range out.Tags {
		v := &out.Tags[i]
		if v.Fresh.After(fresh) {
			v.Fresh = fresh
		}
		if v.Stale.After(stale) {
			v.Stale = stale
		}
		v.Ver, v.Event = min(v.Ver, maxVer), min(v.Event, maxVer)
	}
	return out
}

// store writes a loaded result to both tiers.
func (c *Cache) store(account string, res Fetched) {
	now := c.now()
	rec := c.recordOf(res, now)
	if rec == nil {
		return
	}
	// A record held here outranks an older fetch tag by tag (supersedes).
	// One that is gone (evicted, or the tier cleared) cannot: then a fetch
	// sent before a recent change (or within the skew of it) must not bring
	// the old value back.
	if c.local.Get(account, now) != nil || res.Sent.UnixMilli()-c.cfg.ClockSkew.Milliseconds() >= c.changed.since(account) {
		c.local.Merge(account, rec, now)
	}
	if c.cfg.Remote != nil {
		// Best effort and off the callers' path: the tier queues the write
		// and reports its own health.
		c.cfg.Remote.Put(context.Background(), []string{account}, []*Record{rec})
	}
}

// recordOf turns a loaded result into a record, or nil for outcomes that
// must not be cached (transient per-account failures).
func (c *Cache) recordOf(res Fetched, now time.Time) *Record {
	it := res.Item
	ver := res.Sent.UnixMilli()
	switch im.Classify(it.ResultCode) {
	case im.KindOK:
	case im.KindNotFound:
		if cls := im.NoDataClass(it.ResultCode); cls != 0 {
			// No data of one tag class: per class, never account-wide.
			return noDataRecord(cls, it.ResultInfo, ver, now.Add(c.cfg.NegativeTTL))
		}
		return &Record{NotFoundCode: it.ResultCode, NotFoundInfo: it.ResultInfo, NotFoundUntil: now.Add(c.cfg.NegativeTTL), NotFoundVer: ver}
	default:
		return nil
	}
	fresh, stale := c.deadlines(now)
	rec := newRecord(len(res.Tags))
	for _, t := range res.Tags {
		rec.Tags = append(rec.Tags, TagValue{Tag: intern(t), Ver: ver, Fresh: fresh, Stale: stale})
	}
	for _, p := range it.ProfileItem {
		rec.put(TagValue{Tag: intern(p.Tag), Value: p.Value, Set: true, Ver: ver, Fresh: fresh, Stale: stale})
	}
	return rec
}

// oneTagRecord is a record of one tag with room for it, in one allocation
// (a fetch of one tag, the usual case).
type oneTagRecord struct {
	Record
	tag [1]TagValue
}

// newRecord returns an empty record with room for n tags.
func newRecord(n int) *Record {
	if n == 1 {
		r := &oneTagRecord{}
		r.Tags = r.tag[:0]
		return &r.Record
	}
	return &Record{Tags: make([]TagValue, 0, n)}
}

// deadlines are the fresh and stale times of a value learned now.
func (c *Cache) deadlines(now time.Time) (fresh, stale time.Time) {
	return now.Add(c.cfg.TTL), now.Add(c.cfg.TTL + c.cfg.StaleTTL)
}

func (c *Cache) answerLoaded(account string, tags []string, r singleflight.Result, known *Record) Answer {
	if r.Err != nil {
		return c.failed(account, tags, r.Err, known)
	}
	res := r.Val.(Fetched)
	if res.Item.ResultCode != 0 {
		if im.Classify(res.Item.ResultCode) == im.KindTransient && known.state(tags, c.now()) == stateStale {
			c.m.Lookups.WithLabelValues(metrics.LookupStale).Inc()
			return Answer{Item: pick(account, known, tags, c.now()), Source: SourceStale}
		}
		return Answer{Item: im.UserProfile{ToAccount: account, ProfileItem: []im.ProfileItem{},
			ResultCode: res.Item.ResultCode, ResultInfo: res.Item.ResultInfo}, Source: SourceUpstream}
	}
	return Answer{Item: pickItems(account, res.Item.ProfileItem, tags), Source: SourceUpstream}
}

// failed answers an account whose load failed: its stale value if one is
// still servable (stale-if-error), else the error.
func (c *Cache) failed(account string, tags []string, err error, known *Record) Answer {
	if known.state(tags, c.now()) == stateStale {
		c.m.Lookups.WithLabelValues(metrics.LookupStale).Inc()
		return Answer{Item: pick(account, known, tags, c.now()), Source: SourceStale}
	}
	return Answer{Item: im.UserProfile{ToAccount: account}, Err: err}
}

// pick builds the item for tags from a record: set tags in the order asked.
func pick(account string, rec *Record, tags []string, now time.Time) im.UserProfile {
	it, _ := appendPick(make([]im.ProfileItem, 0, len(tags)), account, rec, tags, now)
	return it
}

// oneAnswer is the answer to a lookup of one account and one tag with room
// for its value, so that such a hit costs one allocation. It holds one
// value only: a larger object costs more to clear and scan than the
// allocation it saves.
type oneAnswer struct {
	answer [1]Answer
	items  [1]im.ProfileItem
}

// newAnswers returns Get's answers for n accounts and tags tags, and room
// for the values of hits when it comes in the same allocation (else nil).
func newAnswers(n, tags int) ([]Answer, []im.ProfileItem) {
	if n == 1 && tags <= len(oneAnswer{}.items) {
		b := &oneAnswer{}
		return b.answer[:], b.items[:0:tags]
	}
	return make([]Answer, n), nil
}

// maxHitItems bounds the room Get sets aside at once for the items of its
// hits (more tags than values set must not cost a large array).
const maxHitItems = 256

// appendPick is pick with the item's values appended to items: the item's
// ProfileItem is the part of items it appended, capped so that appending
// to it cannot overwrite what follows. It is never nil (an answer without
// values encodes as an empty list). Tag strings are those of tags, Values
// those of the record (immutable once stored), shared, not copied.
func appendPick(items []im.ProfileItem, account string, rec *Record, tags []string, now time.Time) (im.UserProfile, []im.ProfileItem) {
	if rec.NotFoundCode != 0 && now.Before(rec.NotFoundUntil) {
		return im.UserProfile{ToAccount: account, ProfileItem: []im.ProfileItem{}, ResultCode: rec.NotFoundCode, ResultInfo: rec.NotFoundInfo}, items
	}
	if it, ok := rec.noDataItem(account, tags, now); ok {
		return it, items
	}
	start := len(items)
	for _, t := range tags {
		if v, _ := rec.Tag(t); v.Set {
			items = append(items, im.ProfileItem{Tag: t, Value: v.Value})
		}
	}
	if len(items) == start {
		return im.UserProfile{ToAccount: account, ProfileItem: []im.ProfileItem{}}, items
	}
	return im.UserProfile{ToAccount: account, ProfileItem: items[start:len(items):len(items)]}, items
}

// pickItems builds the item for tags from a fetched item.
func pickItems(account string, fetched []im.ProfileItem, tags []string) im.UserProfile {
	items := make([]im.ProfileItem, 0, len(tags))
	for _, t := range tags {
		for _, p := range fetched {
			if p.Tag == t {
				items = append(items, p)
				break
			}
		}
	}
	return im.UserProfile{ToAccount: account, ProfileItem: items}
}
