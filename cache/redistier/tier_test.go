package redistier

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// hostileIDs are account ids that are valid for IM (printable ASCII, ≤ 32
// bytes) but dangerous in a naive key scheme.
var hostileIDs = []string{
	"plain", "a:b", "{slot}", "x}{y", "*", "?[]", "with space", `quo"te`, `back\slash`, "pp:v2:1:plain",
	"~" + b64.EncodeToString([]byte("plain")), strings.Repeat("z", 32), "-", "@.", "\x7e", "end}",
}

type tier struct {
	r      *Tier
	m      *metrics.Metrics
	stop   func()
	client redis.UniversalClient
}

func startTier(t *testing.T, spec string, app uint64, hooks ...redis.Hook) *tier {
	t.Helper()
	client, err := NewClient(spec, ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hooks {
		client.AddHook(h)
	}
	m := metrics.New(prometheus.NewRegistry())
	r, err := New(Config{Client: client, SDKAppID: app, Metrics: m, ProbeEvery: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	tr := &tier{r: r, m: m, client: client}
	tr.stop = func() { cancel(); <-done; client.Close() }
	t.Cleanup(tr.stop)
	return tr
}

func testRecord(account string, now time.Time) *cache.Record {
	return &cache.Record{Tags: []cache.TagValue{
		{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(strconv.Quote("nick-" + account)), Set: true, Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
		{Tag: "Tag_Profile_IM_Level", Value: json.RawMessage("18446744073709551615"), Set: true, Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
		{Tag: "Tag_Profile_IM_Location", Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}, // unset
		{Tag: "Tag_Profile_Custom_Test", Value: json.RawMessage(`"c"`), Set: true, Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
	}}
}

// written tells whether account's hash exists: the tier writes back off
// the caller's path, so tests wait (wait.For) until it does.
func written(tr *tier, account string) func() bool {
	return func() bool { return tr.client.Exists(context.Background(), tr.r.Key(account)).Val() != 0 }
}

// writeBack names account's write-back in a wait's failure.
func writeBack(account string) string { return fmt.Sprintf("the write-back of %q", account) }

func checkRoundTrip(t *testing.T, tr *tier) {
	t.Helper()
	ctx := context.Background()
	now := time.Now().Truncate(time.Millisecond)
	for _, id := range hostileIDs {
		if err := tr.r.Put(ctx, []string{id}, []*cache.Record{testRecord(id, now)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range hostileIDs {
		wait.For(t, 5*time.Second, writeBack(id), written(tr, id))
	}
	tags := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_IM_Location", "Tag_Profile_Custom_Test", "Tag_Profile_IM_Gender"}
	trips := testutil.ToFloat64(tr.m.RedisRoundTrips)
	recs, err := tr.r.Get(ctx, hostileIDs, tags)
	if err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(tr.m.RedisRoundTrips) - trips; got != 1 {
		t.Fatalf("%d round trips for one Get of %d accounts", int(got), len(hostileIDs))
	}
	for i, id := range hostileIDs {
		rec := recs[i]
		if rec == nil {
			t.Fatalf("%q: nothing read back", id)
		}
		want := testRecord(id, now)
		if len(rec.Tags) != 4 {
			t.Fatalf("%q: tags %v", id, rec.Tags)
		}
		for _, w := range want.Tags {
			tag := w.Tag
			g, _ := rec.Tag(tag)
			if g.Set != w.Set || string(g.Value) != string(w.Value) || !g.Fresh.Equal(w.Fresh) || !g.Stale.Equal(w.Stale) {
				t.Fatalf("%q %s: got %+v want %+v", id, tag, g, w)
			}
		}
		if rec.Serves(tags[:4], now) != cache.StateFresh || rec.Serves(tags, now) != cache.StateMiss {
			t.Fatalf("%q: states wrong", id)
		}
	}
}

func TestRedisRoundTripHostileIDs(t *testing.T) {
	srv := redistest.Start(t)
	checkRoundTrip(t, startTier(t, srv.URL(), 1400000000))
}

func TestRedisClusterRoundTripHostileIDs(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	tr := startTier(t, c.Addrs(), 1400000000)
	checkRoundTrip(t, tr)
	// The accounts spread over the masters.
	used := 0
	for _, s := range c.Servers {
		if n, _ := s.Do("DBSIZE"); n != "0" {
			used++
		}
	}
	if used < 2 {
		t.Fatalf("keys on %d of 3 masters", used)
	}
}

func TestRedisKeysPerApp(t *testing.T) {
	srv := redistest.Start(t)
	a := startTier(t, srv.URL(), 1)
	b := startTier(t, srv.URL(), 2)
	now := time.Now()
	a.r.Put(context.Background(), []string{"u1"}, []*cache.Record{testRecord("u1", now)})
	wait.For(t, 5*time.Second, writeBack("u1"), written(a, "u1"))
	recs, err := b.r.Get(context.Background(), []string{"u1"}, []string{"Tag_Profile_IM_Nick"})
	if err != nil || recs[0] != nil {
		t.Fatalf("app 2 read app 1's entry: %+v %v", recs[0], err)
	}
	if a.r.Key("u1") == b.r.Key("u1") {
		t.Fatal("two apps share a key")
	}
}

func TestRedisNegativeAndClear(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1)
	ctx := context.Background()
	now := time.Now().Truncate(time.Millisecond)
	tr.r.Put(ctx, []string{"ghost"}, []*cache.Record{{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: now.Add(30 * time.Second)}})
	wait.For(t, 5*time.Second, writeBack("ghost"), written(tr, "ghost"))
	recs, _ := tr.r.Get(ctx, []string{"ghost"}, []string{"Tag_Profile_IM_Nick"})
	if recs[0] == nil || recs[0].NotFoundCode != 40003 || recs[0].NotFoundInfo != "gone" || !recs[0].NotFoundUntil.Equal(now.Add(30*time.Second)) {
		t.Fatalf("negative entry %+v", recs[0])
	}
	// Found later: the negative entry is cleared.
	tr.r.Put(ctx, []string{"ghost"}, []*cache.Record{testRecord("ghost", now)})
	wait.For(t, 5*time.Second, "the negative entry cleared by the found record", func() bool {
		recs, _ := tr.r.Get(ctx, []string{"ghost"}, []string{"Tag_Profile_IM_Nick"})
		if recs[0] == nil || recs[0].NotFoundCode != 0 {
			return false
		}
		v, _ := recs[0].Tag("Tag_Profile_IM_Nick")
		return v.Set
	})
	if ttl := tr.client.PTTL(ctx, tr.r.Key("ghost")).Val(); ttl <= 0 || ttl > time.Hour+time.Minute {
		t.Fatalf("key TTL %v", ttl)
	}
}

func TestRedisGarbageIgnored(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1)
	ctx := context.Background()
	key := tr.r.Key("u1")
	tr.client.HSet(ctx, key, "a", "\x07junk", "k", "\x01\x01\x01{not json", negField, "\xff\xff")
	recs, err := tr.r.Get(ctx, []string{"u1"}, []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level"})
	if err != nil || recs[0] != nil {
		t.Fatalf("garbage served: %+v %v", recs[0], err)
	}
}

// TestRedisDownSkippedThenBack: a dead Redis fails one Get, is skipped
// without network work until it answers PING again, and is used again.
func TestRedisDownSkippedThenBack(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1)
	ctx := context.Background()
	srv.Kill()
	if _, err := tr.r.Get(ctx, []string{"u1"}, []string{"Tag_Profile_IM_Nick"}); err == nil {
		t.Fatal("Get on a dead Redis succeeded")
	}
	if tr.r.Up() || testutil.ToFloat64(tr.m.RedisUp) != 0 {
		t.Fatal("tier not marked down")
	}
	start := time.Now()
	for range 100 {
		if _, err := tr.r.Get(ctx, []string{"u1"}, []string{"Tag_Profile_IM_Nick"}); !errors.Is(err, ErrDown) {
			t.Fatalf("while down: %v", err)
		}
	}
	if d := time.Since(start); d > 50*time.Millisecond {
		t.Fatalf("100 skipped Gets took %v", d)
	}
	if err := tr.r.Put(ctx, []string{"u1"}, []*cache.Record{testRecord("u1", time.Now())}); !errors.Is(err, ErrDown) {
		t.Fatalf("Put while down: %v", err)
	}
	srv.Restart()
	wait.For(t, 5*time.Second, "the tier to come back", tr.r.Up)
	tr.r.Put(ctx, []string{"u1"}, []*cache.Record{testRecord("u1", time.Now())})
	wait.For(t, 5*time.Second, writeBack("u1"), written(tr, "u1"))
}

// TestRedisBytesPerEntry reports the memory one cached account+tag takes.
func TestRedisBytesPerEntry(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	ctx := context.Background()
	now := time.Now()
	const n = 2000
	for i := range n {
		id := "user" + strconv.Itoa(i)
		tr.r.Put(ctx, []string{id}, []*cache.Record{testRecord(id, now)})
	}
	last := "user" + strconv.Itoa(n-1)
	wait.For(t, 5*time.Second, writeBack(last), written(tr, last))
	var total int64
	for i := range n {
		total += tr.client.MemoryUsage(ctx, tr.r.Key("user"+strconv.Itoa(i))).Val()
	}
	perEntry := float64(total) / float64(n*4)
	t.Logf("Redis MEMORY USAGE: %.0f bytes per account (4 tags), %.0f bytes per account+tag", float64(total)/n, perEntry)
	if perEntry > 100 {
		t.Fatalf("%.0f bytes per entry: the encoding is not compact", perEntry)
	}
}

// TestRedisConcurrentReadsShare: Gets that arrive together share pipelines
// (far fewer round trips than Gets) and each gets exactly its own accounts
// and tags, on one server and across a cluster's masters.
func TestRedisConcurrentReadsShare(t *testing.T) {
	for name, spec := range map[string]func(*testing.T) string{
		"single":  func(t *testing.T) string { return redistest.Start(t).URL() },
		"cluster": func(t *testing.T) string { return redistest.StartCluster(t, 3).Addrs() },
	} {
		t.Run(name, func(t *testing.T) {
			tr := startTier(t, spec(t), 1400000000)
			ctx := context.Background()
			now := time.Now().Truncate(time.Millisecond)
			const n = 300
			accs := make([]string, n)
			for i := range accs {
				accs[i] = fmt.Sprint("u", i)
				tr.r.Put(ctx, accs[i:i+1], []*cache.Record{testRecord(accs[i], now)})
			}
			for _, a := range accs {
				wait.For(t, 5*time.Second, writeBack(a), written(tr, a))
			}
			wait.For(t, 5*time.Second, "the readers to start", tr.r.readersOn.Load)
			trips := testutil.ToFloat64(tr.m.RedisRoundTrips)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i, a := range accs {
				wg.Go(func() {
					<-start
					tags := []string{"Tag_Profile_IM_Nick"}
					if i%2 == 1 {
						tags = []string{"Tag_Profile_IM_Level", "Tag_Profile_IM_Nick"}
					}
					recs, err := tr.r.Get(ctx, []string{a, "absent-" + a}, tags)
					if err != nil {
						t.Error(err)
						return
					}
					if len(recs) != 2 || recs[1] != nil {
						t.Errorf("%s: %d records, the absent one %v", a, len(recs), recs[len(recs)-1])
						return
					}
					got := map[string]string{}
					for _, tv := range recs[0].Tags {
						got[tv.Tag] = string(tv.Value)
					}
					if got["Tag_Profile_IM_Nick"] != strconv.Quote("nick-"+a) || len(got) != len(tags) {
						t.Errorf("%s asked %v, read %v", a, tags, got)
					}
					if i%2 == 1 && got["Tag_Profile_IM_Level"] != "18446744073709551615" {
						t.Errorf("%s: level %q", a, got["Tag_Profile_IM_Level"])
					}
				})
			}
			close(start)
			wg.Wait()
			used := testutil.ToFloat64(tr.m.RedisRoundTrips) - trips
			if used >= n/2 {
				t.Fatalf("%d concurrent Gets took %v round trips: reads are not shared", n, used)
			}
			t.Logf("%d concurrent Gets in %v round trips", n, used)
		})
	}
}

// hmgetCounter counts the HMGETs of the pipelines a client sends, as
// they are sent: one per account a reader reads.
type hmgetCounter struct{ n atomic.Int64 }

func (*hmgetCounter) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (*hmgetCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *hmgetCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			if c.Name() == "hmget" {
				h.n.Add(1)
			}
		}
		return next(ctx, cmds)
	}
}

// TestRedisReadsEndWithRun: Gets waiting for a reader while Redis hangs
// fail when the read times out, or when Run ends, but none hangs; after
// Run, Gets read on their own.
func TestRedisReadsEndWithRun(t *testing.T) {
	srv := redistest.Start(t)
	sent := &hmgetCounter{}
	tr := startTier(t, srv.URL(), 1, sent)
	wait.For(t, 5*time.Second, "the readers to start", tr.r.readersOn.Load)
	srv.Pause()
	var wg sync.WaitGroup
	var failed atomic.Int32
	for i := range 50 {
		wg.Go(func() {
			if _, err := tr.r.Get(context.Background(), []string{fmt.Sprint("u", i)}, []string{"Tag_Profile_IM_Nick"}); err != nil {
				failed.Add(1)
			}
		})
	}
	// Every Get is on the hung server with a reader or queued for one, unless
	// the readers' timeout has already taken the tier down.
	wait.For(t, 5*time.Second, "50 Gets sent or queued", func() bool {
		return sent.n.Load()+int64(len(tr.r.reads)) == 50 || !tr.r.Up()
	})
	t.Logf("%d Gets sent, %d queued, tier up %v", sent.n.Load(), len(tr.r.reads), tr.r.Up())
	tr.stop()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Gets still waiting 5s after Run ended")
	}
	srv.Resume()
	if failed.Load() != 50 {
		t.Fatalf("%d of 50 Gets on a hung Redis failed", failed.Load())
	}
	if tr.r.readersOn.Load() {
		t.Fatal("readers still marked on after Run")
	}
}
