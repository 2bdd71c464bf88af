package capacity

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
)

// TagSet is one kind of lookup in the tag mix: the tags it asks for and
// its share of the lookups.
type TagSet struct {
	Tags   []string
	Weight float64
}

// ChangeMode is how the fleet learns of a profile change.
type ChangeMode string

// Change modes.
const (
	ChangeApply      ChangeMode = "apply"      // portrait_set through the proxy or a signed callback: the value is applied everywhere
	ChangeInvalidate ChangeMode = "invalidate" // unsigned callback: the tag is dropped everywhere, the next lookup fetches it
	ChangeNone       ChangeMode = "none"       // no callback: caches learn at their TTL
)

// Workload is what a fleet is asked and how it is configured. Zero values
// take the proxy's defaults where it has one.
type Workload struct {
	Rate     float64 // lookups per second, fleet-wide (single-account requests)
	Accounts int     // audience: ranks 1..Accounts of a Zipf law
	Skew     float64 // Zipf exponent s (0: uniform)
	Missing  float64 // share of the audience that does not exist (answered "not found")
	Tags     []TagSet
	// DefaultTags are fetched with every call (-default-tags).
	DefaultTags []string
	// ChangeRate is profile changes per second, fleet-wide, spread over
	// accounts as their lookups are (the active change more).
	ChangeRate float64
	ChangeMode ChangeMode
	Replicas   int
	// LocalAccounts is each replica's in-process tier (-local-accounts):
	// 0 means the proxy's default, negative none.
	LocalAccounts int
	Redis         bool // a shared Redis tier (and feed) behind the replicas
	TTL           time.Duration
	StaleTTL      time.Duration
	NegativeTTL   time.Duration
	Quota         float64       // upstream calls per second for the app (-rate)
	Hold          time.Duration // one upstream call, sent to answered
	Window        time.Duration // -batch-window
	BatchMax      int           // -batch-max
	// RequestTimeout is the callers' deadline (-request-timeout): a missed
	// lookup the quota cannot serve within it is answered at once, shed.
	RequestTimeout time.Duration
}

// SimConfig says how much of a workload is simulated.
type SimConfig struct {
	Seed     uint64
	Warmup   time.Duration // simulated, not counted
	Duration time.Duration // simulated and counted
	// Exact is how many of the most popular accounts are simulated each
	// on its own (weight 1). Zero means 2,000.
	Exact int
	// Sample is how many accounts are simulated in all; the rest of the
	// audience is represented by a systematic sample of ranks, each
	// standing for 1/R accounts. Zero means 200,000.
	Sample int
	// Lookups bounds the lookups of sampled accounts simulated one by one
	// (R is lowered until the sample's expected lookups fit). Zero means
	// 5,000,000.
	Lookups float64
}

// Counts are weighted event counts over the measured time.
type Counts struct {
	Lookups                                  float64
	LocalFresh, LocalStale, LocalNeg         float64 // served by the in-process tier
	LocalMiss                                float64
	RedisFresh, RedisStale, RedisNeg         float64 // served by the Redis tier
	RedisMiss                                float64 // missed both tiers (Redis on) or went upstream (Redis off)
	Joined                                   float64 // missed, joined a fetch in flight on the replica
	Fetches, Refreshes                       float64 // accounts fetched for a missed lookup / in the background for a stale one
	RedisReads, RedisWrites, RedisChangeOps  float64 // commands
	Changes                                  float64
	Calls, CallAccounts, ShedAccounts        float64 // from the batching model
	Shed, DroppedRefreshes                   float64 // lookups answered at once (60007): the quota could not serve them in time; refreshes given up
	LocalHeld, LocalTagsHeld                 float64 // at the end, summed over replicas
	RedisLive, RedisTagsLive, RedisSteadyAcc float64 // at the end; RedisSteadyAcc: after TTL+StaleTTL of this load
}

// Result is a simulation's outcome.
type Result struct {
	Workload Workload
	Sim      SimConfig
	Batcher  batcher.Config `json:"-"`
	Counts   Counts
	Seconds  float64 // measured simulated time
	Events   int     // simulation steps taken (for the cost of a run)
	Exact    int     // accounts simulated one by one
	Sampled  int     // accounts in the sample (Exact included)
	TailRate float64 // R: the share of the remaining audience in the sample
	LocalSim int     // per-replica tier size the sample ran with (SHARDS scaling)
}

// Defaults fills a Workload's zero values with the proxy's defaults.
func (w Workload) Defaults() Workload {
	if w.Replicas <= 0 {
		w.Replicas = 1
	}
	if w.LocalAccounts == 0 {
		w.LocalAccounts = cache.DefaultLocalAccounts
	}
	if w.TTL <= 0 {
		w.TTL = cache.DefaultTTL
	}
	if w.StaleTTL <= 0 {
		w.StaleTTL = cache.DefaultStaleTTL
	}
	if w.NegativeTTL <= 0 {
		w.NegativeTTL = cache.DefaultNegativeTTL
	}
	if w.Quota <= 0 {
		w.Quota = 100
	}
	if w.Hold <= 0 {
		w.Hold = 25 * time.Millisecond
	}
	if len(w.Tags) == 0 {
		w.Tags = []TagSet{{Tags: []string{"Tag_Profile_IM_Nick"}, Weight: 1}}
	}
	if w.ChangeMode == "" {
		w.ChangeMode = ChangeApply
	}
	if w.RequestTimeout <= 0 {
		w.RequestTimeout = 5 * time.Second
	}
	return w
}

func (w Workload) validate() error {
	switch {
	case w.Rate <= 0:
		return errors.New("capacity: Rate must be positive")
	case w.Accounts <= 0:
		return errors.New("capacity: Accounts must be positive")
	case w.Skew < 0:
		return errors.New("capacity: Skew must not be negative")
	case w.Missing < 0 || w.Missing > 1:
		return errors.New("capacity: Missing must be in [0, 1]")
	case w.ChangeRate < 0:
		return errors.New("capacity: ChangeRate must not be negative")
	}
	switch w.ChangeMode {
	case ChangeApply, ChangeInvalidate, ChangeNone:
	default:
		return fmt.Errorf("capacity: unknown change mode %q", w.ChangeMode)
	}
	for _, ts := range w.Tags {
		if len(ts.Tags) == 0 || ts.Weight <= 0 {
			return errors.New("capacity: every tag set needs tags and a positive weight")
		}
	}
	return nil
}

// batchConfig is the batcher's own configuration for w's flags, defaults
// filled in by batcher.New.
func batchConfig(w Workload) (batcher.Config, error) {
	b, err := batcher.New(batcher.Config{Upstream: noUpstream{}, Limiter: noLimiter{}, Window: w.Window, MaxAccounts: w.BatchMax,
		DefaultTags: w.DefaultTags})
	if err != nil {
		return batcher.Config{}, err
	}
	return b.Config(), nil
}

type noUpstream struct{}

func (noUpstream) PortraitGet(context.Context, im.GetRequest) (*im.GetResponse, error) {
	return nil, errors.New("capacity: no upstream")
}

// noLimiter stands in for the limiter: batchConfig only reads defaults.
type noLimiter struct{}

func (noLimiter) Acquire(context.Context) (*limiter.Permit, error) {
	return nil, errors.New("capacity: no limiter")
}
func (noLimiter) Throttled(time.Duration) {}
func (noLimiter) Factor() float64         { return 1 }
func (noLimiter) Paused() time.Duration   { return 0 }
func (noLimiter) Rate() float64           { return 0 }

// noLoader is the simulated caches' Loader: the simulator fetches itself
// and stores results through Cache.Fetched, so a Load is a bug.
type noLoader struct{}

func (noLoader) Admit(int, time.Time, bool) (cache.Ticket, error) { return nil, nil }
func (noLoader) Promote(string)                                   {}
func (noLoader) Load(context.Context, cache.Lookup) (cache.Fetched, error) {
	return cache.Fetched{}, errors.New("capacity: no loader")
}

// account is one simulated account.
type account struct {
	id         string
	rate       float64 // lookups/s, fleet-wide
	w          float64 // accounts of the audience it stands for
	exists     bool
	hot        bool    // one arrival stream per replica (and skipping), else one stream
	change     float64 // changes/s
	nextChange int64
}

const (
	evArrival = iota
	evFetched
	evChange
	evTick
)

type event struct {
	t    int64 // ns of simulated time
	seq  uint64
	kind uint8
	acct int32
	rep  int32 // -1: a cold account's stream (the replica is drawn per arrival)
}

type flight struct {
	tags []string
	sent int64
	done int64 // when its answer is stored
}

type sim struct {
	w    Workload
	sc   SimConfig
	bc   batcher.Config
	rng  *rand.Rand
	base time.Time
	now  int64
	// clock is now for the caches' Now, which their background goroutines
	// (the refresh-mark sweeper) read too.
	clock  atomic.Int64
	warm   int64
	end    int64
	seq    uint64
	heap   []event
	accs   []account
	local  []*cache.Local
	caches []*cache.Cache
	redis  *cache.Local // the shared tier's records (the same merge rules as the Lua script)
	apply  []func(string, *cache.Record, time.Time)
	flight map[int64]flight
	// The quota as a queue: fetches leave at most fcap accounts a second
	// (full calls at the limiter's most), in order; vfin is when the
	// fetches queued so far will have left.
	fcap    float64
	vfin    int64
	backoff map[int64]int64 // replica+account → no refresh before (after one was given up)
	cum     []float64       // tag mix, cumulative weights
	union   []string        // every tag the mix asks for
	tick    []float64       // weighted fetch starts per replica since tickAt (counted ones only)
	tickAt  int64
	c       Counts
	events  int
}

// Simulate replays w in simulated time through the proxy's own cache rules
// and returns what it counted. It is deterministic for a given seed, up to
// one thing: when an in-process tier is full, cache.Local evicts the least
// recently used of a few records sampled in Go's randomized map order, so
// runs that evict agree only statistically.
func Simulate(w Workload, sc SimConfig) (*Result, error) {
	w = w.Defaults()
	if err := w.validate(); err != nil {
		return nil, err
	}
	bc, err := batchConfig(w)
	if err != nil {
		return nil, err
	}
	if sc.Exact <= 0 {
		sc.Exact = 2_000
	}
	if sc.Sample <= 0 {
		sc.Sample = 200_000
	}
	if sc.Lookups <= 0 {
		sc.Lookups = 5_000_000
	}
	if sc.Duration <= 0 {
		return nil, errors.New("capacity: Duration must be positive")
	}
	s := &sim{w: w, sc: sc, bc: bc, rng: rand.New(rand.NewPCG(sc.Seed, sc.Seed^0x9e3779b97f4a7c15)),
		base: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC), warm: int64(sc.Warmup), end: int64(sc.Warmup + sc.Duration),
		flight: map[int64]flight{}, backoff: map[int64]int64{}}
	s.fcap = float64(bc.MaxAccounts) * w.Quota / (1 + w.Hold.Seconds())
	res := &Result{Workload: w, Sim: sc, Batcher: bc}
	s.plan(res)
	if err := s.build(res); err != nil {
		return nil, err
	}
	defer func() {
		for _, c := range s.caches {
			c.Close()
		}
	}()
	s.run()
	s.measure()
	res.Counts = s.c
	res.Seconds = sc.Duration.Seconds()
	res.Events = s.events
	return res, nil
}

// plan picks the accounts to simulate: the Exact most popular one by one,
// then a systematic sample of the remaining ranks (every 1/R-th, from a
// random start), each standing for 1/R accounts. Popularity varies little
// between neighbouring ranks there, so the sample represents them well; a
// per-replica tier is scaled as SHARDS does (Waldspurger et al., FAST
// 2015): the exact accounts count one each, the rest of its room R each.
func (s *sim) plan(res *Result) {
	w := s.w
	z := NewZipf(w.Accounts, w.Skew)
	exact := min(w.Accounts, s.sc.Exact)
	if w.LocalAccounts > 0 {
		exact = min(exact, max(1, w.LocalAccounts/2))
	}
	tailN := w.Accounts - exact
	nt := min(tailN, max(0, s.sc.Sample-exact))
	r := 1.0
	if tailN > 0 {
		r = float64(nt) / float64(tailN)
		if lookups := w.Rate * z.Mass(exact+1, w.Accounts) * (s.sc.Warmup + s.sc.Duration).Seconds(); lookups*r > s.sc.Lookups {
			r = s.sc.Lookups / lookups
			nt = max(1, int(r*float64(tailN)))
			r = float64(nt) / float64(tailN)
		}
	}
	add := func(rank int, weight float64) {
		p := z.P(rank)
		a := account{id: "user" + strconv.Itoa(rank-1), rate: w.Rate * p, w: weight,
			exists: unit(uint64(rank), s.sc.Seed) >= w.Missing, change: w.ChangeRate * p}
		a.hot = a.rate/float64(w.Replicas)*w.TTL.Seconds() >= 2
		s.accs = append(s.accs, a)
	}
	for k := 1; k <= exact; k++ {
		add(k, 1)
	}
	if nt > 0 {
		u := s.rng.Float64()
		for i := range nt {
			add(exact+1+int((float64(i)+u)/r), 1/r)
		}
	}
	res.Exact, res.Sampled, res.TailRate = exact, len(s.accs), r
	if w.LocalAccounts > 0 {
		res.LocalSim = max(1, min(w.LocalAccounts, exact)+int(math.Ceil(float64(max(0, w.LocalAccounts-exact))*r)))
	} else {
		res.LocalSim = -1
	}
}

// unit maps (x, seed) to [0, 1) (splitmix64).
func unit(x, seed uint64) float64 {
	z := x + seed + 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	z ^= z >> 31
	return float64(z>>11) / (1 << 53)
}

// build makes each replica's tiers and cache, and the first events.
func (s *sim) build(res *Result) error {
	w := s.w
	s.redis = cache.NewLocal(64 * (len(s.accs) + 64)) // never full: Redis has no eviction here
	s.apply = make([]func(string, *cache.Record, time.Time), w.Replicas)
	clock := func() time.Time { return s.at(s.clock.Load()) }
	// The shared tier merges with the clock skew, as write.lua does with
	// redistier's default: a Local takes its skew from the cache built over
	// it. With none, Redis kept a fetch sent within the skew of a tombstone
	// that every replica's tier refuses.
	rc, err := cache.New(cache.Config{Loader: noLoader{}, Local: s.redis, Now: clock})
	if err != nil {
		return err
	}
	rc.Close()
	following := make(chan struct{}, w.Replicas)
	for j := range w.Replicas {
		l := cache.NewLocal(res.LocalSim)
		cfg := cache.Config{Loader: noLoader{}, Local: l, TTL: w.TTL, StaleTTL: w.StaleTTL, NegativeTTL: w.NegativeTTL, Now: clock}
		if w.Redis {
			cfg.Remote = &tier{s: s, rep: j, following: following}
		}
		c, err := cache.New(cfg)
		if err != nil {
			return err
		}
		s.local = append(s.local, l)
		s.caches = append(s.caches, c)
	}
	if w.Redis && res.LocalSim > 0 {
		for range w.Replicas { // every replica's cache follows the feed before anything changes
			<-following
		}
	}
	total := 0.0
	for _, ts := range w.Tags {
		total += ts.Weight
		s.cum = append(s.cum, total)
		for _, t := range ts.Tags {
			if !slices.Contains(s.union, t) {
				s.union = append(s.union, t)
			}
		}
	}
	s.tick = make([]float64, w.Replicas)
	for i := range s.accs {
		a := &s.accs[i]
		if a.hot {
			for j := range w.Replicas {
				s.push(s.exp(a.rate/float64(w.Replicas)), evArrival, i, j)
			}
		} else {
			s.push(s.exp(a.rate), evArrival, i, -1)
		}
		a.nextChange = math.MaxInt64
		if w.ChangeMode != ChangeNone && a.change > 0 {
			a.nextChange = s.exp(a.change)
			s.push(a.nextChange, evChange, i, 0)
		}
	}
	s.push(int64(time.Second), evTick, 0, 0)
	return nil
}

// tier is the shared tier as one replica's cache sees it: Changes go to
// the shared records and, as the Redis feed carries them, to every other
// replica's in-process tier, synchronously in simulated time.
type tier struct {
	s         *sim
	rep       int
	following chan struct{}
}

func (t *tier) Get(context.Context, []string, []string) ([]*cache.Record, error) {
	return nil, errors.New("capacity: read through the simulator")
}

func (t *tier) Put(_ context.Context, accounts []string, recs []*cache.Record) error {
	for i, a := range accounts {
		t.s.redis.Merge(a, recs[i], t.s.at(t.s.now))
	}
	return nil
}

// The simulated tier must stay a cache.Feed, or the caches would neither
// follow nor announce changes.
var _ cache.Feed = (*tier)(nil)

func (t *tier) Change(_ context.Context, account string, rec *cache.Record, existing bool) error {
	now := t.s.at(t.s.now)
	if existing {
		t.s.redis.MergeExisting(account, rec, now)
	} else {
		t.s.redis.Merge(account, rec, now)
	}
	for j, apply := range t.s.apply {
		if j != t.rep && apply != nil {
			apply(account, rec, time.Now()) // sent: the feed-delay metric is of no interest here
		}
	}
	return nil
}

func (t *tier) Follow(ctx context.Context, apply func(string, *cache.Record, time.Time), _ func()) {
	t.s.apply[t.rep] = apply
	t.following <- struct{}{}
	<-ctx.Done()
}

func (s *sim) at(t int64) time.Time { return s.base.Add(time.Duration(t)) }

// exp returns the time of the next event of a Poisson process of rate r
// per second from now (MaxInt64 when r is 0).
func (s *sim) exp(r float64) int64 { return s.expFrom(s.now, r) }

func (s *sim) expFrom(t int64, r float64) int64 {
	if r <= 0 {
		return math.MaxInt64
	}
	d := s.rng.ExpFloat64() / r * 1e9
	if d >= float64(math.MaxInt64-t) {
		return math.MaxInt64
	}
	return t + int64(d)
}

func (s *sim) push(t int64, kind uint8, acct, rep int) {
	if t >= s.end {
		return
	}
	s.seq++
	s.heap = append(s.heap, event{t: t, seq: s.seq, kind: kind, acct: int32(acct), rep: int32(rep)})
	h := s.heap
	i := len(h) - 1
	for i > 0 {
		p := (i - 1) / 2
		if !less(h[i], h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func less(a, b event) bool { return a.t < b.t || a.t == b.t && a.seq < b.seq }

func (s *sim) pop() event {
	h := s.heap
	top := h[0]
	n := len(h) - 1
	h[0] = h[n]
	h = h[:n]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < n && less(h[l], h[m]) {
			m = l
		}
		if r := l + 1; r < n && less(h[r], h[m]) {
			m = r
		}
		if m == i {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	s.heap = h
	return top
}

func (s *sim) run() {
	for len(s.heap) > 0 {
		e := s.pop()
		s.now = e.t
		s.clock.Store(s.now)
		s.events++
		switch e.kind {
		case evArrival:
			s.arrival(int(e.acct), int(e.rep))
		case evFetched:
			s.fetched(int(e.acct), int(e.rep))
		case evChange:
			s.changed(int(e.acct))
		case evTick:
			s.batches()
			s.push(s.now+int64(time.Second), evTick, 0, 0)
		}
	}
	s.now = s.end
	s.clock.Store(s.now)
	s.batches() // the last, partial second
}

func (s *sim) counting() bool { return s.now >= s.warm }

func (s *sim) tags() []string {
	if len(s.cum) == 1 {
		return s.w.Tags[0].Tags
	}
	x := s.rng.Float64() * s.cum[len(s.cum)-1]
	i, _ := slices.BinarySearch(s.cum, x)
	return s.w.Tags[min(i, len(s.cum)-1)].Tags
}

// arrival is one lookup of account i on replica rep (-1: draw one), by
// the path of cache.Cache.Get: the in-process tier, then the shared tier,
// then a fetch (joined if one is in flight on the replica).
func (s *sim) arrival(i, rep int) {
	a := &s.accs[i]
	j := rep
	if j < 0 {
		j = s.rng.IntN(s.w.Replicas)
	}
	tags := s.tags()
	now := s.at(s.now)
	cnt := s.counting()
	wt := 0.0
	if cnt {
		wt = a.w
	}
	s.c.Lookups += wt
	rec := s.local[j].Get(a.id, now)
	switch rec.Serves(tags, now) {
	case cache.StateFresh, cache.StateNotFound:
		if rec.NotFoundCode != 0 {
			s.c.LocalNeg += wt
		} else {
			s.c.LocalFresh += wt
		}
		if rep >= 0 {
			s.skip(i, j, rec, false)
			return
		}
	case cache.StateStale:
		s.c.LocalStale += wt
		s.fetch(i, j, tags, true)
		if rep >= 0 {
			s.skip(i, j, rec, true)
			return
		}
	default:
		s.c.LocalMiss += wt
		s.shared(i, j, tags, rec, wt)
	}
	s.next(i, rep)
}

// shared is a lookup that missed the in-process tier.
func (s *sim) shared(i, j int, tags []string, rec *cache.Record, wt float64) {
	a := &s.accs[i]
	now := s.at(s.now)
	if s.w.Redis {
		s.c.RedisReads += wt
		if r := s.redis.Get(a.id, now); r != nil {
			// As cache.Get: the answer comes from the replica's record with
			// Redis's merged in (a tombstone held here outranks a Redis
			// value within the clock skew of it: a miss).
			switch cache.Merge(rec, r, cache.DefaultClockSkew.Milliseconds()).Serves(tags, now) {
			case cache.StateFresh, cache.StateNotFound:
				if r.NotFoundCode != 0 {
					s.c.RedisNeg += wt
				} else {
					s.c.RedisFresh += wt
				}
				s.local[j].Merge(a.id, r, now)
				return
			case cache.StateStale:
				s.c.RedisStale += wt
				s.local[j].Merge(a.id, r, now)
				s.fetch(i, j, tags, true)
				return
			}
		}
	}
	s.c.RedisMiss += wt
	s.fetch(i, j, tags, false)
}

func (s *sim) next(i, rep int) {
	a := &s.accs[i]
	r := a.rate
	if rep >= 0 {
		r /= float64(s.w.Replicas)
	}
	s.push(s.exp(r), evArrival, i, rep)
}

// skip follows a hit on a hot account's stream. Until the record's first
// fresh deadline (or the account's next change) every lookup on this
// replica is a fresh hit as well; after a stale hit, every lookup is a
// stale hit that starts nothing until its refresh is answered or its
// backoff ends (or a tag passes its stale time). So they are counted at
// once (their expected number) instead of one by one, and the record is
// marked used until then.
func (s *sim) skip(i, j int, rec *cache.Record, stale bool) {
	a := &s.accs[i]
	now := s.at(s.now)
	h := min(s.end, a.nextChange)
	if stale {
		key := int64(i)*int64(s.w.Replicas) + int64(j)
		if f, ok := s.flight[key]; ok {
			h = min(h, f.done)
		} else if until, ok := s.backoff[key]; ok {
			h = min(h, until)
		} else {
			h = s.now
		}
	}
	switch {
	case !stale && rec.NotFoundCode != 0 && now.Before(rec.NotFoundUntil):
		h = min(h, rec.NotFoundUntil.Sub(s.base).Nanoseconds())
	default:
		for _, t := range s.union {
			v, ok := rec.Tag(t)
			until := v.Fresh
			if stale {
				until = v.Stale
			}
			if !ok || !now.Before(until) {
				h = s.now
				break
			}
			h = min(h, until.Sub(s.base).Nanoseconds())
		}
	}
	r := a.rate / float64(s.w.Replicas)
	if h <= s.now || r*float64(h-s.now)/1e9 < 1 {
		s.next(i, j)
		return
	}
	if from := max(s.now, s.warm); h > from {
		n := r * float64(h-from) / 1e9 * a.w
		s.c.Lookups += n
		switch {
		case stale:
			s.c.LocalStale += n
		case rec.NotFoundCode != 0:
			s.c.LocalNeg += n
		default:
			s.c.LocalFresh += n
		}
	}
	s.local[j].Get(a.id, s.at(h))
	s.push(s.expFrom(h, r), evArrival, i, j)
}

// fetch starts a fetch of account i on replica j unless one is in flight
// there (singleflight). It waits its turn in the quota's queue, goes with
// the next batch (one window later at the earliest) and is answered a
// call's hold after it is sent. A lookup whose turn would come after its
// deadline is shed at once, as the batcher's Admit does; a background
// refresh is given up after the cache's RefreshTimeout, and not tried
// again for its RefreshBackoff (the cache's defaults).
func (s *sim) fetch(i, j int, tags []string, background bool) {
	const refreshTimeout, refreshBackoff = cache.DefaultRefreshTimeout, cache.DefaultRefreshBackoff
	a := &s.accs[i]
	key := int64(i)*int64(s.w.Replicas) + int64(j)
	if _, ok := s.flight[key]; ok {
		if !background && s.counting() {
			s.c.Joined += a.w
		}
		return
	}
	wait := max(0, s.vfin-s.now)
	if background {
		if until, ok := s.backoff[key]; ok {
			if s.now < until {
				return
			}
			delete(s.backoff, key)
		}
		if wait > int64(refreshTimeout) {
			s.backoff[key] = s.now + int64(refreshBackoff)
			if s.counting() {
				s.c.DroppedRefreshes += a.w
			}
			return
		}
	} else if wait > int64(s.w.RequestTimeout) {
		if s.counting() {
			s.c.Shed += a.w
		}
		return
	}
	s.vfin = max(s.vfin, s.now) + int64(a.w/s.fcap*1e9)
	fetchTags := slices.Clone(s.bc.DefaultTags)
	for _, t := range tags {
		if !slices.Contains(fetchTags, t) {
			fetchTags = append(fetchTags, t)
		}
	}
	sent := max(s.now+int64(s.bc.Window), s.vfin)
	s.flight[key] = flight{tags: fetchTags, sent: sent, done: sent + int64(s.w.Hold)}
	s.push(sent+int64(s.w.Hold), evFetched, i, j)
	if s.counting() {
		if background {
			s.c.Refreshes += a.w
		} else {
			s.c.Fetches += a.w
		}
		s.tick[j] += a.w
	}
}

// fetched stores a fetch's answer as the cache does: the record it makes
// of the result, merged into the replica's tier and written back to the
// shared one.
func (s *sim) fetched(i, j int) {
	a := &s.accs[i]
	key := int64(i)*int64(s.w.Replicas) + int64(j)
	f := s.flight[key]
	delete(s.flight, key)
	it := im.UserProfile{ToAccount: a.id}
	if a.exists {
		for _, t := range f.tags {
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: json.RawMessage(`"v"`)})
		}
	} else {
		it.ResultCode, it.ResultInfo = im.CodeAccountNotFound, "account not found"
	}
	now := s.at(s.now)
	rec := s.caches[j].Fetched(cache.Fetched{Item: it, Tags: f.tags, Sent: s.at(f.sent)}, now)
	if rec == nil {
		return
	}
	s.local[j].Merge(a.id, rec, now)
	if s.w.Redis {
		s.redis.Merge(a.id, rec, now)
		if s.counting() {
			s.c.RedisWrites += a.w
		}
	}
}

// changed is a profile change of account i, told to one replica (a
// portrait_set through it, or the change callback it received).
func (s *sim) changed(i int) {
	a := &s.accs[i]
	j := s.rng.IntN(s.w.Replicas)
	now := s.at(s.now)
	tag := s.union[0]
	if a.exists {
		if s.w.ChangeMode == ChangeApply {
			s.caches[j].Change(context.Background(), a.id, []im.ProfileItem{{Tag: tag, Value: json.RawMessage(`"changed"`)}},
				cache.FromCallback, now.UnixMilli(), now)
		} else {
			s.caches[j].Invalidate(context.Background(), a.id, []string{tag}, cache.FromCallback, now)
		}
		if s.counting() {
			s.c.Changes += a.w
			if s.w.Redis {
				s.c.RedisChangeOps += 2 * a.w // the versioned write and the PUBLISH
			}
		}
	}
	a.nextChange = s.exp(a.change)
	s.push(a.nextChange, evChange, i, 0)
}

// batches turns the replicas' fetches of the last second into upstream
// calls with the batcher's rules (see Calls) and resets the counts.
func (s *sim) batches() {
	from := max(s.warm, s.tickAt)
	if dt := float64(s.now-from) / 1e9; dt > 0 {
		for j := range s.tick {
			s.tick[j] /= dt
		}
		calls, shed := Calls(s.tick, s.w.Quota, s.w.Hold, s.bc.Window, s.bc.MaxAccounts)
		for _, m := range s.tick {
			s.c.CallAccounts += m * dt
		}
		s.c.Calls += calls * dt
		s.c.CallAccounts -= shed * dt
		s.c.ShedAccounts += shed * dt
	}
	clear(s.tick)
	s.tickAt = s.now
}

// measure counts what the tiers hold at the end.
func (s *sim) measure() {
	end := s.at(s.end)
	epoch := time.Unix(0, 0) // a Get this early does not mark the record used
	keyTTL := (s.w.TTL + s.w.StaleTTL).Seconds()
	for i := range s.accs {
		a := &s.accs[i]
		for _, l := range s.local {
			if r := l.Get(a.id, epoch); r != nil {
				s.c.LocalHeld += a.w
				s.c.LocalTagsHeld += a.w * float64(len(r.Tags))
			}
		}
		if r := s.redis.Get(a.id, epoch); r != nil {
			live := r.NotFoundCode != 0 && r.NotFoundUntil.After(end)
			for _, v := range r.Tags {
				live = live || v.Stale.After(end)
			}
			if live {
				s.c.RedisLive += a.w
				s.c.RedisTagsLive += a.w * float64(len(r.Tags))
			}
		}
		if s.w.Redis {
			// a key lives TTL+StaleTTL past its last write, and every
			// lookup within that time writes it again at most a TTL later
			s.c.RedisSteadyAcc += a.w * -math.Expm1(-a.rate*keyTTL)
		}
	}
}

// Calls is the upstream call rate of replicas fetching m[j] accounts a
// second each (Poisson) with the batcher's rules, and the accounts a
// second the quota cannot carry. A replica's batch opens at its first
// account and is ready after the window: u = m/(1 + m·window) ready batches
// a second (one replica alone, far from the quota, makes u calls). The
// shared limiter grants calls of all replicas at most T = (1 s + hold)/quota
// apart (a call holds its slot of the one-second window from sent until a
// second after its answer), and a batch waiting for its grant keeps
// filling. With U = Σu ready batches a second arriving at random, the gap
// between calls is max(T, the wait for the next ready batch), whose mean
// is T + e^{-U·T}/U. A call carries at most maxAccounts: past 1/T full calls
// a second the rest is shed (answered at once with a stale value or 60007).
func Calls(m []float64, quota float64, hold, window time.Duration, maxAccounts int) (calls, shed float64) {
	u, total := 0.0, 0.0
	for _, x := range m {
		if x > 0 {
			u += x / (1 + x*window.Seconds())
			total += x
		}
	}
	if u == 0 {
		return 0, 0
	}
	t := (1 + hold.Seconds()) / quota
	calls = 1 / (t + math.Exp(-u*t)/u)
	if total/calls > float64(maxAccounts) {
		calls = total / float64(maxAccounts)
	}
	if calls > 1/t {
		shed = total - float64(maxAccounts)/t
		calls = 1 / t
	}
	return calls, max(0, shed)
}
