package cache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Redis is the shared tier: one Redis hash per account, keyed by SDKAppID
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
// PING succeeds. Redis is safe for concurrent use; Run owns its goroutine.
type Redis struct {
	cfg    RedisConfig
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
	skew        int64  // ms
	feed        string // the change channel
}

// RedisConfig configures the Redis tier. Client and SDKAppID are required.
type RedisConfig struct {
	// Client is a single-node or cluster client (see NewRedisClient).
	Client redis.UniversalClient
	// SDKAppID is part of every key: two apps never share an entry.
	SDKAppID uint64
	// KeyTTL is how long an account's hash lives after its last write;
	// set it to TTL + StaleTTL. Zero means 1h1m.
	KeyTTL time.Duration
	// Timeout bounds one read pipeline. Zero means 250ms.
	Timeout time.Duration
	// ProbeEvery is how often a down tier is PINGed. Zero means 250ms.
	ProbeEvery time.Duration
	// WriteQueue is how many write-backs may wait; more are dropped.
	// Zero means 100,000.
	WriteQueue int
	// ClockSkew is how far apart the clocks of the replicas and the
	// upstream may be; see supersedes. Zero means 1s.
	ClockSkew time.Duration
	// Replica names this process on the change feed (its own changes are
	// not applied twice); empty means random.
	Replica string
	Metrics *metrics.Metrics
}

type write struct {
	account string
	rec     *Record
}

// RedisClientOptions are the Redis settings beyond the address.
type RedisClientOptions struct {
	// Password, when set, replaces the URL's password (so it can come
	// from a secret rather than the URL); the user stays the URL's
	// ("default" when the URL names none).
	Password string
	// CAFile is a PEM file of the roots that verify the servers' TLS
	// certificates (rediss://); empty means the system's roots.
	CAFile string
}

// NewRedisClient returns a client for the proxy's -redis flag:
//
//   - redis://[user:password@]host:port/db, or rediss:// for TLS: one server;
//   - redis://[user:password@]host:port,host:port,…, or rediss://…: a Redis
//     Cluster (its seed nodes) with AUTH and TLS, every node verified under
//     its own host name;
//   - host:port,host:port,…: a Redis Cluster without AUTH or TLS.
//
// Timeouts are short and retries off: a slow Redis must not slow lookups
// down. Errors never repeat the spec (it may hold a password).
func NewRedisClient(spec string, o RedisClientOptions) (redis.UniversalClient, error) {
	const timeout = 250 * time.Millisecond
	var tlsConf **tls.Config
	var client func() redis.UniversalClient
	if scheme, rest, ok := strings.Cut(spec, "://"); ok {
		authority := rest
		if i := strings.IndexAny(authority, "/?"); i >= 0 {
			authority = authority[:i]
		}
		at := strings.LastIndexByte(authority, '@') + 1 // hosts start here
		hosts := authority[at:]
		if nodes := strings.Split(hosts, ","); len(nodes) > 1 {
			// ParseClusterURL takes the first node in the URL and the others
			// as addr parameters.
			u := scheme + "://" + rest[:at] + nodes[0] + rest[at+len(hosts):]
			sep := "?"
			if strings.Contains(u, "?") {
				sep = "&"
			}
			for _, n := range nodes[1:] {
				u += sep + "addr=" + url.QueryEscape(strings.TrimSpace(n))
				sep = "&"
			}
			opt, err := redis.ParseClusterURL(u)
			if err != nil {
				return nil, fmt.Errorf("cache: -redis is not a valid cluster URL: %w", redactURLError(err))
			}
			if opt.TLSConfig != nil {
				opt.TLSConfig.ServerName = "" // each node is verified under its own name
			}
			opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
			opt.MaxRetries, opt.DialerRetries, opt.ContextTimeoutEnabled = -1, 1, true
			if o.Password != "" {
				opt.Password = o.Password
			}
			tlsConf = &opt.TLSConfig
			client = func() redis.UniversalClient { return redis.NewClusterClient(opt) }
		} else {
			opt, err := redis.ParseURL(spec)
			if err != nil {
				return nil, fmt.Errorf("cache: -redis is not a valid URL: %w", redactURLError(err))
			}
			opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = timeout, timeout, timeout, timeout
			opt.MaxRetries = -1
			opt.DialerRetries = 1 // one dial per attempt: no retry loop on the request path
			opt.ContextTimeoutEnabled = true
			if o.Password != "" {
				opt.Password = o.Password
			}
			tlsConf = &opt.TLSConfig
			client = func() redis.UniversalClient { return redis.NewClient(opt) }
		}
	} else {
		var addrs []string
		for _, a := range strings.Split(spec, ",") {
			if a = strings.TrimSpace(a); a != "" {
				addrs = append(addrs, a)
			}
		}
		if len(addrs) == 0 {
			return nil, errors.New("cache: empty redis address list")
		}
		opt := &redis.ClusterOptions{Addrs: addrs, Password: o.Password,
			DialTimeout: timeout, ReadTimeout: timeout, WriteTimeout: timeout, PoolTimeout: timeout,
			MaxRetries: -1, DialerRetries: 1, ContextTimeoutEnabled: true}
		tlsConf = &opt.TLSConfig
		client = func() redis.UniversalClient { return redis.NewClusterClient(opt) }
	}
	if *tlsConf != nil {
		(*tlsConf).MinVersion = tls.VersionTLS12
	}
	if o.CAFile != "" {
		if *tlsConf == nil {
			return nil, errors.New("cache: a Redis CA file needs TLS: use a rediss:// URL")
		}
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("cache: Redis CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("cache: Redis CA file %s holds no PEM certificate", o.CAFile)
		}
		(*tlsConf).RootCAs = pool
	}
	return client(), nil
}

// redactURLError keeps a URL parse error's cause but not the URL, which
// may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// ErrRedisDown is returned by Get while the tier is skipped.
var ErrRedisDown = errors.New("cache: redis is down; skipped")

// NewRedis validates cfg and returns the tier. Nothing runs until Run.
func NewRedis(cfg RedisConfig) (*Redis, error) {
	if cfg.Client == nil || cfg.SDKAppID == 0 {
		return nil, errors.New("cache: RedisConfig.Client and SDKAppID are required")
	}
	if cfg.KeyTTL <= 0 {
		cfg.KeyTTL = time.Hour + time.Minute
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
		cfg.ClockSkew = time.Second
	}
	if cfg.Replica == "" {
		cfg.Replica = strconv.FormatUint(rand.Uint64(), 36)
	}
	app := strconv.FormatUint(cfg.SDKAppID, 10)
	r := &Redis{cfg: cfg, m: cfg.Metrics, downc: make(chan struct{}, 1), queue: make(chan write, cfg.WriteQueue),
		claims: make(chan *claim, 1024), reads: make(chan *read, 4096), readersDone: make(chan struct{}), app: app, skew: cfg.ClockSkew.Milliseconds(),
		feed: "pp:v2:" + app + ":changes"}
	r.up.Store(true)
	r.m.RedisUp.Set(1)
	return r, nil
}

// claimKey is the key of the "being fetched" marker of account.
func (r *Redis) claimKey(account string) string { return r.Key(account) + ":f" }

// ClaimTTL bounds how long a claim holds when its owner never writes back
// (it died): waiters fetch themselves after that.
const ClaimTTL = 3 * time.Second

// Claim sets account's marker if none is set (SET NX): owned means this
// replica fetches. In the same pipeline, after the SET, it reads the
// record: a replica that wrote its result and dropped its marker just
// before has its result there (record and marker share a slot, so the
// order holds on a cluster too). Claims from concurrent lookups are sent
// together, one pipeline for all that are waiting, by Run. While the tier
// is down every replica fetches.
func (r *Redis) Claim(ctx context.Context, account string, tags []string) (bool, *Record, error) {
	if !r.up.Load() {
		return true, nil, nil
	}
	c := &claim{account: account, tags: tags, done: make(chan struct{})}
	select {
	case r.claims <- c:
	case <-ctx.Done():
		return true, nil, ctx.Err()
	}
	select {
	case <-c.done:
		return c.owned, c.rec, c.err
	case <-ctx.Done():
		return true, nil, ctx.Err()
	}
}

type claim struct {
	account string
	tags    []string
	owned   bool
	rec     *Record
	err     error
	done    chan struct{}
}

// runClaims sends waiting claims in pipelines until ctx ends.
func (r *Redis) runClaims(ctx context.Context) {
	batch := make([]*claim, 0, 256)
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case c := <-r.claims:
					c.owned, c.err = true, ErrRedisDown
					close(c.done)
				default:
					return
				}
			}
		case c := <-r.claims:
			batch = gather(append(batch[:0], c), r.claims, func(b []*claim) bool { return len(b) == cap(b) })
			r.sendClaims(batch)
		}
	}
}

func (r *Redis) sendClaims(batch []*claim) {
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
	defer cancel()
	pipe := r.cfg.Client.Pipeline()
	sets := make([]*redis.BoolCmd, len(batch))
	gets := make([]*redis.SliceCmd, len(batch))
	for i, c := range batch {
		sets[i] = pipe.SetNX(ctx, r.claimKey(c.account), 1, ClaimTTL)
		gets[i] = pipe.HMGet(ctx, r.Key(c.account), fieldsOf(c.tags)...)
	}
	r.m.RedisRoundTrips.Inc()
	cmds, err := pipe.Exec(ctx)
	if err != nil && (errors.Is(err, redis.Nil) || onlyKeyErrors(r.m, cmds)) {
		err = nil
	}
	if err != nil {
		r.down("claim", err)
	}
	for i, c := range batch {
		switch {
		case err != nil:
			c.owned, c.err = true, err
		case sets[i].Err() != nil || gets[i].Err() != nil:
			c.owned = true // a key of another type: fetch here, as if unclaimed
		default:
			c.owned, c.rec = sets[i].Val(), decodeRecord(c.tags, gets[i].Val())
		}
		close(c.done)
	}
}

func fieldsOf(tags []string) []string {
	tags = readTags(tags)
	fields := make([]string, 0, len(tags)+1)
	for _, t := range tags {
		fields = append(fields, fieldOf(t))
	}
	return append(fields, negField)
}

// Release deletes account's marker (after a failed fetch), best effort.
func (r *Redis) Release(account string) {
	if !r.up.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
	defer cancel()
	if err := r.cfg.Client.Del(ctx, r.claimKey(account)).Err(); err != nil {
		r.down("release", err)
	}
}

// Poll reads account's record for tags and whether its marker is set, in
// one round trip.
func (r *Redis) Poll(ctx context.Context, account string, tags []string) (*Record, bool, error) {
	if !r.up.Load() {
		return nil, false, ErrRedisDown
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	pipe := r.cfg.Client.Pipeline()
	get := pipe.HMGet(ctx, r.Key(account), fieldsOf(tags)...)
	exists := pipe.Exists(ctx, r.claimKey(account))
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, err
	}
	return decodeRecord(tags, get.Val()), exists.Val() == 1, nil
}

// Up reports whether the tier is in use.
func (r *Redis) Up() bool { return r.up.Load() }

func (r *Redis) down(op string, err error) {
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
func (r *Redis) Key(account string) string { return "pp:v2:" + r.app + ":{" + escapeID(account) + "}" }

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
func (r *Redis) Get(ctx context.Context, accounts, tags []string) ([]*Record, error) {
	if !r.up.Load() {
		return nil, ErrRedisDown
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
		return nil, ErrRedisDown
	}
	select {
	case <-q.done:
		return q.recs, q.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-r.readersDone:
		return nil, ErrRedisDown
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
func (r *Redis) readNow(ctx context.Context, accounts, tags []string) ([]*Record, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	q := &read{accounts: accounts, tags: tags}
	r.readBatch(ctx, []*read{q})
	return q.recs, q.err
}

// read is one Get waiting for a reader.
type read struct {
	accounts, tags []string
	recs           []*Record
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
// it fails what still waits with ErrRedisDown (the lookups go on without
// the tier).
func (r *Redis) runReaders(ctx context.Context) {
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
			q.err = ErrRedisDown
			close(q.done)
		default:
			return
		}
	}
}

func (r *Redis) sendReads(batch []*read) {
	if r.up.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
		defer cancel()
		r.readBatch(ctx, batch)
	} else { // went down while these waited: skip it, as Get would
		for _, q := range batch {
			q.err = ErrRedisDown
		}
	}
	for _, q := range batch {
		close(q.done)
	}
}

// readBatch reads every read of batch in one pipeline and sets its records
// or its error.
func (r *Redis) readBatch(ctx context.Context, batch []*read) {
	pipe := r.cfg.Client.Pipeline()
	var cmds []*redis.SliceCmd
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
			q.err = fmt.Errorf("cache: redis get: %w", err)
		}
		return
	}
	for _, q := range batch {
		q.recs = make([]*Record, len(q.accounts))
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
func (r *Redis) Put(_ context.Context, accounts []string, recs []*Record) error {
	if !r.up.Load() {
		r.m.RedisDropped.Add(float64(len(accounts)))
		return ErrRedisDown
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
func (r *Redis) Run(ctx context.Context) error {
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

func (r *Redis) probe(ctx context.Context) {
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

func (r *Redis) flush(batch []write) {
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
func (r *Redis) exec(ctx context.Context, fill func(pipe redis.Pipeliner, load bool)) error {
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

// Modes of writeScript (its ARGV[4]).
const (
	writeMerge    = "0" // merge the fields, keep the key TTL-long
	writeRelease  = "1" // the same, and drop the claim marker (a fetch's write-back)
	writeExisting = "2" // only fields the hash holds; no negative entry, no new key, TTL untouched
)

// queueWrite adds account's versioned write to pipe (see writeScript).
func (r *Redis) queueWrite(ctx context.Context, pipe redis.Pipeliner, account string, rec *Record, mode string, load bool) {
	args := make([]any, 4, 4+2*len(rec.Tags))
	args[0], args[1], args[2], args[3] = r.cfg.KeyTTL.Milliseconds(), r.skew, "", mode
	if rec.NotFoundCode != 0 && mode != writeExisting {
		args[2] = string(encodeNeg(nil, rec))
	}
	var buf []byte
	for _, v := range rec.Tags {
		buf = encodeTag(buf[:0], v)
		args = append(args, fieldOf(v.Tag), string(buf))
	}
	keys := []string{r.Key(account), r.claimKey(account)}
	if load {
		writeScript.Eval(ctx, pipe, keys, args...)
	} else {
		writeScript.EvalSha(ctx, pipe, keys, args...)
	}
}

// writeScript writes one account's fields, each only if it supersedes the
// field stored (the rules of supersedes, on the encoded form). A write
// that stores a tag clears the negative entry, unless it is known as of a
// time before that entry (changedAt; an invalidation always clears); a
// negative entry is stored only if no stored tag is newer, and then replaces
// every tag; a class entry ("!s", "!c") is stored only if it supersedes every
// stored field of its class, and a stored field of a class removes that
// class's entry unless the entry supersedes it (the rules of merge; the same
// callback again changes nothing). KEYS: the hash,
// the claim marker. ARGV: key TTL (ms), clock skew (ms), the negative entry
// or "", the mode (0: merge; 1: merge and drop the claim marker; 2: only
// fields the hash already holds, the key's TTL left as it is: it creates
// nothing), then field/value pairs. Returns the number of fields stored.
var writeScript = redis.NewScript(`
local function be48(s, i)
  local v = 0
  for k = i, i + 5 do v = v * 256 + string.byte(s, k) end
  return v
end
local skew = tonumber(ARGV[2])
local existing = ARGV[4] == '2'
local function supersedes(u, o)
  if not o or #o < 13 then return true end
  local uo, oo = math.floor(string.byte(u, 1) / 2), math.floor(string.byte(o, 1) / 2)
  local uv, ov = be48(u, 2), be48(o, 2)
  if uo == 0 then
    if oo == 0 then return uv >= ov end
    return uv - skew >= ov
  elseif uo == 1 or uo == 3 then
    return uv >= ov
  end
  local ue, oe = be48(u, 8), be48(o, 8)
  if oo == 2 then return ue >= oe end
  return ue > oe and ue + skew > ov
end
local function class(f)
  if f == '!' or f == '!s' or f == '!c' then return nil end
  if #f == 1 then return 's' end
  return 'c'
end
local function body(s)
  local i = 14
  for _ = 1, 2 do
    while (string.byte(s, i) or 0) >= 128 do i = i + 1 end
    i = i + 1
  end
  return string.sub(s, i)
end
local function again(u, o)
  return o and #o >= 13 and string.byte(u, 1) >= 4 and string.byte(u, 1) < 6 and string.sub(u, 1, 1) == string.sub(o, 1, 1)
    and string.sub(u, 8, 13) == string.sub(o, 8, 13) and body(u) == body(o)
end
local hash = nil
local function entryFits(f, u)
  if f ~= '!s' and f ~= '!c' then return true end
  local c = string.sub(f, 2)
  hash = hash or redis.call('HGETALL', KEYS[1])
  for i = 1, #hash, 2 do
    if class(hash[i]) == c and not supersedes(u, hash[i + 1]) then return false end
  end
  return true
end
local fields = {}
for i = 5, #ARGV, 2 do fields[#fields + 1] = ARGV[i] end
local n = 0
if #fields > 0 then
  local olds = redis.call('HMGET', KEYS[1], unpack(fields))
  local negOld = redis.call('HGET', KEYS[1], '!')
  local negVer = nil
  if negOld and #negOld >= 6 then negVer = be48(negOld, 1) end
  local set = {}
  for j = 1, #fields do
    local u, o = ARGV[4 + 2 * j], olds[j]
    local uo = math.floor(string.byte(u, 1) / 2)
    local early = negVer and uo ~= 3 and (uo == 2 and be48(u, 8) or be48(u, 2)) < negVer -- changedAt
    if not early and (o or not existing) and supersedes(u, o) and not again(u, o) and entryFits(fields[j], u) then
      if o and #o >= 13 and math.floor(string.byte(u, 1) / 2) ~= 2 and be48(o, 8) > be48(u, 8) then
        u = string.sub(u, 1, 7) .. string.sub(o, 8, 13) .. string.sub(u, 14) -- keep the newest EventTime seen
      end
      set[#set + 1] = fields[j]
      set[#set + 1] = u
    end
  end
  if #set > 0 then
    redis.call('HSET', KEYS[1], unpack(set))
    redis.call('HDEL', KEYS[1], '!')
    n = #set / 2
    for _, c in ipairs({'s', 'c'}) do
      local e = redis.call('HGET', KEYS[1], '!' .. c)
      if e then
        for k = 1, #set, 2 do
          if class(set[k]) == c and (#e < 13 or not supersedes(e, set[k + 1])) then
            redis.call('HDEL', KEYS[1], '!' .. c)
            break
          end
        end
      end
    end
  end
end
if ARGV[3] ~= '' then
  local neg = ARGV[3]
  local old = redis.call('HGET', KEYS[1], '!')
  local ok = not old or #old < 6 or be48(neg, 1) >= be48(old, 1)
  if ok then
    local probe = string.char(0) .. string.sub(neg, 1, 6) .. string.rep(string.char(0), 6)
    local all = redis.call('HGETALL', KEYS[1])
    local drop = {}
    for i = 1, #all, 2 do
      if all[i] ~= '!' then
        if not supersedes(probe, all[i + 1]) then ok = false break end
        drop[#drop + 1] = all[i]
      end
    end
    if ok and #drop > 0 then redis.call('HDEL', KEYS[1], unpack(drop)) end
  end
  if ok then
    redis.call('HSET', KEYS[1], '!', neg)
    n = n + 1
  end
end
if not existing then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
return n
`)

// Field names: one byte for each standard tag, '~' + the suffix for custom
// tags, the full name for anything else; negField holds "no such account".
const negField = "!"

var standardField = func() map[string]string {
	m := map[string]string{}
	for i, t := range im.StandardTags {
		m[t] = string(rune('a' + i))
	}
	return m
}()

func fieldOf(tag string) string {
	if f, ok := standardField[tag]; ok {
		return f
	}
	if suffix, ok := strings.CutPrefix(tag, "Tag_Profile_Custom_"); ok {
		return "~" + suffix
	}
	return tag
}

// A tag field is: flags (bit 0: set; bits 1-2: Origin), Ver and Event as
// 6-byte big-endian Unix milliseconds (fixed width, so the write script
// reads them without parsing), fresh and stale deadlines as uvarint Unix
// milliseconds, then the value's JSON bytes exactly as the upstream sent
// them. A negative entry is Ver (6 bytes), the code and deadline as
// uvarints, then the message.
const fieldHead = 13

func appendBE48(b []byte, v int64) []byte {
	u := uint64(max(v, 0))
	return append(b, byte(u>>40), byte(u>>32), byte(u>>24), byte(u>>16), byte(u>>8), byte(u))
}

func be48(b []byte) int64 {
	return int64(b[0])<<40 | int64(b[1])<<32 | int64(b[2])<<24 | int64(b[3])<<16 | int64(b[4])<<8 | int64(b[5])
}

func encodeTag(b []byte, v TagValue) []byte {
	flags := byte(v.Origin) << 1
	if v.Set {
		flags |= 1
	}
	b = append(b, flags)
	b = appendBE48(b, v.Ver)
	b = appendBE48(b, v.Event)
	b = binary.AppendUvarint(b, uint64(v.Fresh.UnixMilli()))
	b = binary.AppendUvarint(b, uint64(v.Stale.UnixMilli()))
	return append(b, v.Value...)
}

func decodeTag(s string) (TagValue, bool) {
	b := []byte(s)
	if len(b) < fieldHead+2 || b[0] > 7 || b[0]>>1 > byte(FromInvalidate) {
		return TagValue{}, false
	}
	v := TagValue{Set: b[0]&1 == 1, Origin: Origin(b[0] >> 1), Ver: be48(b[1:]), Event: be48(b[7:])}
	b = b[fieldHead:]
	fresh, n := binary.Uvarint(b)
	if n <= 0 {
		return TagValue{}, false
	}
	stale, m := binary.Uvarint(b[n:])
	if m <= 0 {
		return TagValue{}, false
	}
	v.Fresh, v.Stale = time.UnixMilli(int64(fresh)), time.UnixMilli(int64(stale))
	if rest := b[n+m:]; len(rest) > 0 {
		if !json.Valid(rest) {
			return TagValue{}, false
		}
		v.Value = json.RawMessage(rest)
	}
	return v, true
}

func encodeNeg(b []byte, r *Record) []byte {
	b = appendBE48(b, r.NotFoundVer)
	b = binary.AppendUvarint(b, uint64(r.NotFoundCode))
	b = binary.AppendUvarint(b, uint64(r.NotFoundUntil.UnixMilli()))
	return append(b, r.NotFoundInfo...)
}

func decodeNeg(s string, rec *Record) bool {
	b := []byte(s)
	if len(b) < 6 {
		return false
	}
	ver := be48(b)
	b = b[6:]
	code, n := binary.Uvarint(b)
	if n <= 0 || code == 0 {
		return false
	}
	until, m := binary.Uvarint(b[n:])
	if m <= 0 {
		return false
	}
	rec.NotFoundCode, rec.NotFoundUntil, rec.NotFoundInfo, rec.NotFoundVer = int(code), time.UnixMilli(int64(until)), string(b[n+m:]), ver
	return true
}

// decodeRecord builds a record from HMGET's answer for tags + negField;
// nil when nothing usable came back. Entries that do not decode are
// ignored (treated as misses), never served.
func decodeRecord(tags []string, vals []any) *Record {
	tags = readTags(tags)
	var rec *Record
	for i, t := range tags {
		s, ok := vals[i].(string)
		if !ok {
			continue
		}
		v, ok := decodeTag(s)
		if !ok {
			continue
		}
		if rec == nil {
			rec = &Record{Tags: make([]TagValue, 0, len(tags))}
		}
		v.Tag = intern(t)
		rec.put(v)
	}
	if s, ok := vals[len(tags)].(string); ok {
		var neg Record
		if decodeNeg(s, &neg) {
			if rec == nil {
				rec = &Record{}
			}
			rec.NotFoundCode, rec.NotFoundUntil, rec.NotFoundInfo, rec.NotFoundVer = neg.NotFoundCode, neg.NotFoundUntil, neg.NotFoundInfo, neg.NotFoundVer
		}
	}
	return rec
}
