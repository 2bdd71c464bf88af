// Package redistier is the cache's shared tier in Redis: a cache.Remote
// (one hash per account, read in pipelines shared by concurrent lookups,
// written by a versioned Lua script), a cache.Coordinator (claims: which
// replica fetches a missed account), a cache.Feed (changes announced to
// every replica on a pub/sub channel), the binary encoding of records in
// Redis, and the Redis client the proxy's -redis flag describes.
//
// It imports cache (the record model and the interfaces it implements),
// never the other way round: the cache works with any Remote.
package redistier

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Tier is the shared tier: one Redis hash per account, keyed by SDKAppID
// and account, one field per tag. A lookup for any number of accounts and
// tags is one pipeline of HMGETs (one round trip; on Redis Cluster, one per
// node, in parallel); while Run runs, lookups that arrive while earlier
// ones are on the wire share the next pipeline (see readers). Write-backs
// are queued and sent in pipelines by Run, off the callers' path. No
// command touches two keys, so it works on Redis
// Cluster unchanged.
//
// Redis is a tier, not a single point of failure: commands carry short
// timeouts and no retries; after an error the tier is skipped (Get fails at
// once without touching the network, writes are dropped) until a background
// PING succeeds. Tier is safe for concurrent use; Run owns its goroutine.
type Tier struct {
	cfg    Config
	m      *metrics.Metrics
	up     atomic.Bool
	downc  chan struct{} // poked when the tier goes down
	queue  chan write
	claims chan *claim
	// reads waits for a reader; readersOn says Run's readers are running,
	// readersDone is closed when they have stopped.
	reads       chan *read
	readersOn   atomic.Bool
	readersDone chan struct{}
	app         string
	keyTTL      time.Duration // how long an account's hash lives after its last write
	skew        int64         // ms
	feed        string        // the change channel
}

// Config configures the Redis tier. Client and SDKAppID are required.
type Config struct {
	// Client is a single-node or cluster client (see NewClient).
	Client redis.UniversalClient
	// SDKAppID is part of every key: two apps never share an entry.
	SDKAppID uint64
	// TTL and StaleTTL are the cache's (cache.Config): an account's hash
	// lives cache.KeyLifetime(TTL, StaleTTL) after its last write, as long
	// as a value written then may be served. Zero means the cache's
	// defaults.
	TTL, StaleTTL time.Duration
	// Timeout bounds one read pipeline. Zero means 250ms.
	Timeout time.Duration
	// ProbeEvery is how often a down tier is PINGed. Zero means 250ms.
	ProbeEvery time.Duration
	// WriteQueue is how many write-backs may wait; more are dropped.
	// Zero means 100,000.
	WriteQueue int
	// ClockSkew is how far apart the clocks of the replicas and the
	// upstream may be; see cache.Merge. Zero means cache.DefaultClockSkew.
	ClockSkew time.Duration
	// Replica names this process on the change feed (its own changes are
	// not applied twice); empty means random.
	Replica string
	Metrics *metrics.Metrics
}

// The cache finds a Remote's optional parts by type assertion; a changed
// signature would switch a feature off without a word (it happened once:
// Feed.Change gained a parameter). These fail the build instead.
var (
	_ cache.Remote      = (*Tier)(nil)
	_ cache.Coordinator = (*Tier)(nil)
	_ cache.Feed        = (*Tier)(nil)
	_ cache.BatchFeed   = (*Tier)(nil)
)

type write struct {
	account string
	rec     *cache.Record
}

// ErrDown is returned by Get while the tier is skipped.
var ErrDown = errors.New("redistier: redis is down; skipped")

// New validates cfg and returns the tier. Nothing runs until Run.
func New(cfg Config) (*Tier, error) {
	if cfg.Client == nil || cfg.SDKAppID == 0 {
		return nil, errors.New("redistier: Config.Client and SDKAppID are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 250 * time.Millisecond
	}
	if cfg.ProbeEvery <= 0 {
		cfg.ProbeEvery = 250 * time.Millisecond
	}
	if cfg.WriteQueue <= 0 {
		cfg.WriteQueue = 100_000
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(prometheus.NewRegistry())
	}
	if cfg.ClockSkew <= 0 {
		cfg.ClockSkew = cache.DefaultClockSkew
	}
	if cfg.Replica == "" {
		cfg.Replica = strconv.FormatUint(rand.Uint64(), 36)
	}
	app := strconv.FormatUint(cfg.SDKAppID, 10)
	r := &Tier{cfg: cfg, m: cfg.Metrics, downc: make(chan struct{}, 1), queue: make(chan write, cfg.WriteQueue),
		claims: make(chan *claim, 1024), reads: make(chan *read, 4096), readersDone: make(chan struct{}), app: app,
		keyTTL: cache.KeyLifetime(cfg.TTL, cfg.StaleTTL), skew: cfg.ClockSkew.Milliseconds(),
		feed: "pp:v2:" + app + ":changes"}
	r.up.Store(true)
	r.m.RedisUp.Set(1)
	return r, nil
}

// Up reports whether the tier is in use.
func (r *Tier) Up() bool { return r.up.Load() }

func (r *Tier) down(op string, err error) {
	r.m.RedisErrors.WithLabelValues(op).Inc()
	if r.up.Swap(false) {
		r.m.RedisUp.Set(0)
		select {
		case r.downc <- struct{}{}:
		default:
		}
	}
}

// Key returns the Redis key of account in this app. Ids made only of
// letters, digits and _ . - @ are kept as they are (readable in
// redis-cli); any other id is base64url-encoded behind a '~', so no byte
// of an id can change the key's meaning. The id is the key's hash tag, so
// an account's record and its claim marker share a Cluster slot.
func (r *Tier) Key(account string) string { return "pp:v2:" + r.app + ":{" + escapeID(account) + "}" }

func escapeID(id string) string {
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '.' || c == '-' || c == '@') {
			return "~" + b64.EncodeToString([]byte(id))
		}
	}
	return id
}

// Get reads accounts' records for tags in one pipeline, shared with the
// other Gets waiting at the time while Run runs. A record is nil where
// Redis holds nothing useful for the account.
func (r *Tier) Get(ctx context.Context, accounts, tags []string) ([]*cache.Record, error) {
	if !r.up.Load() {
		return nil, ErrDown
	}
	if !r.readersOn.Load() {
		return r.readNow(ctx, accounts, tags)
	}
	q := &read{accounts: accounts, tags: tags, done: make(chan struct{})}
	select {
	case r.reads <- q:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.readersDone:
		return nil, ErrDown
	}
	select {
	case <-q.done:
		return q.recs, q.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.readersDone:
		return nil, ErrDown
	}
}

// gather appends to batch (which holds a first item) what else waits on
// ch, without waiting, until full says the batch is big enough.
func gather[T any](batch []T, ch <-chan T, full func([]T) bool) []T {
	for !full(batch) {
		select {
		case x := <-ch:
			batch = append(batch, x)
		default:
			return batch
		}
	}
	return batch
}

// readNow is Get without the readers: its own pipeline, now.
func (r *Tier) readNow(ctx context.Context, accounts, tags []string) ([]*cache.Record, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	q := &read{accounts: accounts, tags: tags}
	r.readBatch(ctx, []*read{q})
	return q.recs, q.err
}

// read is one Get waiting for a reader.
type read struct {
	accounts, tags []string
	recs           []*cache.Record
	err            error
	done           chan struct{}
}

// readers is how many pipelines of reads may be on the wire at once. A
// read that arrives while they all are waits and goes with every other
// waiting read in the next one: no read waits for a timer, and under load
// one write and one read syscall (and one Redis event) serve many lookups.
const readers = 2

// maxReadBatch bounds the HMGETs of one coalesced pipeline.
const maxReadBatch = 512

// runReaders sends waiting reads in shared pipelines until ctx ends; then
// it fails what still waits with ErrDown (the lookups go on without
// the tier).
func (r *Tier) runReaders(ctx context.Context) {
	var wg sync.WaitGroup
	for range readers {
		wg.Go(func() {
			batch := make([]*read, 0, 64)
			for ctx.Err() == nil {
				select {
				case <-ctx.Done():
					return
				case q := <-r.reads:
					n := 0 // accounts gathered
					batch = gather(append(batch[:0], q), r.reads, func(b []*read) bool {
						n += len(b[len(b)-1].accounts)
						return n >= maxReadBatch
					})
					r.sendReads(batch)
				}
			}
		})
	}
	r.readersOn.Store(true)
	wg.Wait()
	r.readersOn.Store(false)
	close(r.readersDone)
	for {
		select {
		case q := <-r.reads:
			q.err = ErrDown
			close(q.done)
		default:
			return
		}
	}
}

func (r *Tier) sendReads(batch []*read) {
	if r.up.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
		defer cancel()
		r.readBatch(ctx, batch)
	} else { // went down while these waited: skip it, as Get would
		for _, q := range batch {
			q.err = ErrDown
		}
	}
	for _, q := range batch {
		close(q.done)
	}
}

// readBatch reads every read of batch in one pipeline and sets its records
// or its error.
func (r *Tier) readBatch(ctx context.Context, batch []*read) {
	pipe := r.cfg.Client.Pipeline()
	n := 0
	for _, q := range batch {
		n += len(q.accounts)
	}
	cmds := make([]*redis.SliceCmd, 0, n)
	for _, q := range batch {
		fields := fieldsOf(q.tags)
		for _, a := range q.accounts {
			cmds = append(cmds, pipe.HMGet(ctx, r.Key(a), fields...))
		}
	}
	r.m.RedisRoundTrips.Inc()
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) && !onlyKeyErrors(r.m, cmds) {
		if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			r.down("get", err) // not the caller leaving: Redis failed or was too slow
		}
		for _, q := range batch {
			q.err = fmt.Errorf("redistier: redis get: %w", err)
		}
		return
	}
	for _, q := range batch {
		q.recs = make([]*cache.Record, len(q.accounts))
		for k := range q.recs {
			if cmds[k].Err() == nil {
				q.recs[k] = decodeRecord(q.tags, cmds[k].Val())
			} // else a key of another type: a miss for that account only
		}
		cmds = cmds[len(q.accounts):]
	}
}

// keyError reports whether err is one key's, not the tier's: a key of
// another type where a record or claim should be (WRONGTYPE), which only
// a foreign Redis client can have put there.
func keyError(err error) bool { return redis.HasErrorPrefix(err, "WRONGTYPE") }

// onlyKeyErrors reports whether every failed command of a pipeline failed
// with a key's error (see keyError); it counts them. Those keys are misses
// and their writes are skipped; the tier stays up for every other key.
func onlyKeyErrors[C redis.Cmder](m *metrics.Metrics, cmds []C) bool {
	n := 0
	for _, c := range cmds {
		if err := c.Err(); err != nil && !errors.Is(err, redis.Nil) {
			if !keyError(err) {
				return false
			}
			n++
		}
	}
	m.RedisErrors.WithLabelValues("wrongtype").Add(float64(n))
	return true
}

// Put queues write-backs; Run sends them. When the queue is full or the
// tier is down they are dropped (and counted): the cache is best effort.
func (r *Tier) Put(_ context.Context, accounts []string, recs []*cache.Record) error {
	if !r.up.Load() {
		r.m.RedisDropped.Add(float64(len(accounts)))
		return ErrDown
	}
	for i, a := range accounts {
		select {
		case r.queue <- write{a, recs[i]}:
		default:
			r.m.RedisDropped.Inc()
		}
	}
	return nil
}

// Run sends queued write-backs and claims in pipelines and probes a down
// tier, until ctx ends; then it flushes what is queued (if Redis is up)
// and returns.
func (r *Tier) Run(ctx context.Context) error {
	claimsDone := make(chan struct{})
	go func() { defer close(claimsDone); r.runClaims(ctx) }()
	defer func() { <-claimsDone }()
	readersDone := make(chan struct{})
	go func() { defer close(readersDone); r.runReaders(ctx) }()
	defer func() { <-readersDone }()
	probe := time.NewTicker(r.cfg.ProbeEvery)
	defer probe.Stop()
	batch := make([]write, 0, 256)
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case w := <-r.queue:
					batch = append(batch, w)
					if len(batch) == cap(batch) {
						r.flush(batch)
						batch = batch[:0]
					}
				default:
					r.flush(batch)
					return nil
				}
			}
		case w := <-r.queue:
			batch = gather(append(batch[:0], w), r.queue, func(b []write) bool { return len(b) == cap(b) })
			r.flush(batch)
		case <-probe.C:
			if !r.up.Load() {
				r.probe(ctx)
			}
		case <-r.downc:
		}
	}
}

func (r *Tier) probe(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	if err := r.cfg.Client.Ping(ctx).Err(); err != nil {
		r.m.RedisErrors.WithLabelValues("probe").Inc()
		return
	}
	if cc, ok := r.cfg.Client.(*redis.ClusterClient); ok {
		// Every master must answer, not just one.
		if err := cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return c.Ping(ctx).Err() }); err != nil {
			r.m.RedisErrors.WithLabelValues("probe").Inc()
			return
		}
	}
	r.up.Store(true)
	r.m.RedisUp.Set(1)
}

func (r *Tier) flush(batch []write) {
	if len(batch) == 0 {
		return
	}
	if !r.up.Load() {
		r.m.RedisDropped.Add(float64(len(batch)))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*r.cfg.Timeout)
	defer cancel()
	err := r.exec(ctx, func(pipe redis.Pipeliner, load bool) {
		for _, w := range batch {
			r.queueWrite(ctx, pipe, w.account, w.rec, writeRelease, load)
		}
	})
	if err != nil {
		r.m.RedisDropped.Add(float64(len(batch)))
		r.down("put", err)
	}
}

// exec runs a pipeline built by fill. Scripts are sent by hash; if Redis
// does not know the script (a restart, a failover, a new cluster node) the
// pipeline is built again with the scripts' text. Writes are versioned, so
// sending one twice changes nothing.
func (r *Tier) exec(ctx context.Context, fill func(pipe redis.Pipeliner, load bool)) error {
	for _, load := range []bool{false, true} {
		pipe := r.cfg.Client.Pipeline()
		fill(pipe, load)
		r.m.RedisRoundTrips.Inc()
		cmds, err := pipe.Exec(ctx)
		if err == nil || errors.Is(err, redis.Nil) {
			return nil
		}
		if !load && slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return redis.HasErrorPrefix(c.Err(), "NOSCRIPT") }) {
			continue
		}
		if onlyKeyErrors(r.m, cmds) {
			return nil // the writes to keys of another type are skipped
		}
		return err
	}
	return nil
}
