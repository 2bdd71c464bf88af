package redistier

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// Tests of the cache with this tier as its Remote, Coordinator and Feed,
// against real redis-servers: what one replica changes, another serves.
// (They were cache's tests; they need this package's internals and cache's
// exported API, and cache's own tests cannot import this package without a
// cycle, so they live here. The loaders and helpers gate, nickOf,
// fakeUpstream, clock, raw, item, values, classLoader and checkLookups are
// copies of cache's test helpers of those names.)

const nick = "Tag_Profile_IM_Nick"

// gate is a loader whose calls block until released; each call answers
// with the value current at release.
type gate struct {
	admitAll
	started chan struct{}
	release chan string
}

func (g *gate) Load(ctx context.Context, lk cache.Lookup) (cache.Fetched, error) {
	account, tags := lk.Account, lk.Tags
	sent := time.Now()
	g.started <- struct{}{}
	v := <-g.release
	return cache.Fetched{Tags: tags, Sent: sent, Item: item(account, nick, v)}, nil
}

func newReplica(t *testing.T, l cache.Loader, spec string) (*cache.Cache, *cache.Local, *tier) {
	t.Helper()
	tr := startTier(t, spec, 1400000000)
	local := cache.NewLocal(0)
	c, err := cache.New(cache.Config{Loader: l, Local: local, Remote: tr.r, Metrics: tr.m})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, local, tr
}

func nickOf(t *testing.T, c *cache.Cache, account string) string {
	t.Helper()
	a := c.Get(context.Background(), []string{account}, []string{nick})[0]
	if a.Err != nil || len(a.Item.ProfileItem) != 1 {
		t.Fatalf("lookup of %s: %+v", account, a)
	}
	var s string
	json.Unmarshal(a.Item.ProfileItem[0].Value, &s)
	return s
}

// A fetch sent before a change and answered after it never overwrites the
// change, in either tier.
func TestFetchBeforeChangeLoses(t *testing.T) {
	srv := redistest.Start(t)
	g := &gate{started: make(chan struct{}), release: make(chan string)}
	c, local, tr := newReplica(t, g, srv.URL())
	done := make(chan string)
	go func() { done <- nickOf(t, c, "u1") }()
	<-g.started // the fetch is out, carrying the old value
	// Versions are ms: let the clock pass the fetch's send time, so the
	// change is versioned after it.
	time.Sleep(2 * time.Millisecond)
	if err := c.Change(context.Background(), "u1", []im.ProfileItem{{Tag: nick, Value: raw("new")}}, cache.FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	g.release <- "old"
	if got := <-done; got != "old" {
		t.Fatalf("the caller who asked before the change got %q", got)
	}
	if got := nickOf(t, c, "u1"); got != "new" {
		t.Fatalf("after the late fetch, the cache serves %q", got)
	}
	c.Close()
	tr.stop() // sends what is queued, the late fetch's write-back too
	field, err := srv.Do("HGET", tr.r.Key("u1"), fieldOf(nick))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := decodeTag(field); !ok || string(v.Value) != `"new"` || v.Origin != cache.FromSet {
		t.Fatalf("Redis holds %+v (%v)", v, ok)
	}
	if rec := local.Get("u1", time.Now()); rec == nil {
		t.Fatal("nothing in the in-process tier")
	}
}

// Callbacks applied late, twice and out of order leave the newest value.
func TestCallbacksReorderedAndRepeated(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	c, _, tr := newReplica(t, &up, srv.URL())
	base := time.Now().UnixMilli()
	events := []struct {
		event int64
		value string
	}{{base + 30, "third"}, {base + 10, "first"}, {base + 30, "third"}, {base + 20, "second"}, {base + 10, "first"}}
	for _, e := range events {
		if err := c.Change(context.Background(), "u2", []im.ProfileItem{{Tag: nick, Value: raw(e.value)}}, cache.FromCallback, e.event, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if got := nickOf(t, c, "u2"); got != "third" {
		t.Fatalf("local tier serves %q", got)
	}
	got, _ := tr.r.Get(context.Background(), []string{"u2"}, []string{nick})
	if v, _ := got[0].Tag(nick); string(v.Value) != `"third"` {
		t.Fatalf("Redis holds %s", v.Value)
	}
	if up.calls.Load() != 0 {
		t.Fatalf("%d upstream calls", up.calls.Load())
	}
	if n := testutil.ToFloat64(tr.m.Changes.WithLabelValues(metrics.ChangeCallback, metrics.ChangeOld)); n != 4 {
		t.Fatalf("%v callbacks counted old, want 4 (2 late, 2 repeated)", n)
	}
}

// A change on one replica reaches another's in-process tier through the
// feed; after the feed is cut and back, the other replica's in-process
// tier is dropped (it may have missed changes).
func TestFeedAcrossReplicas(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	a, _, _ := newReplica(t, &up, srv.URL())
	b, localB, trB := newReplica(t, &up, srv.URL())
	if got := nickOf(t, b, "u3"); got != "u3:"+nick+":0" {
		t.Fatalf("b fetched %q", got)
	}
	wait.For(t, 5*time.Second, "2 feed subscribers", subscribed(trB, 2))
	if err := a.Change(context.Background(), "u3", []im.ProfileItem{{Tag: nick, Value: raw("changed")}}, cache.FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	applied := trB.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied)
	// counted right after it is applied
	wait.For(t, 5*time.Second, "replica b to hear of the change", func() bool { return testutil.ToFloat64(applied) != 0 })
	if v, _ := localB.Get("u3", time.Now()).Tag(nick); string(v.Value) != `"changed"` {
		t.Fatalf("b holds %s", v.Value)
	}
	if n := testutil.ToFloat64(applied); n != 1 {
		t.Fatalf("b applied %v feed changes", n)
	}
	if localB.Len() == 0 {
		t.Fatal("b holds nothing")
	}
	srv.Kill()
	srv.Restart()
	wait.For(t, 10*time.Second, "b to drop its in-process tier after the feed was cut", func() bool { return localB.Len() == 0 })
}

// subscribed tells whether n replicas listen on the feed (for wait.For:
// a replica subscribes off New's path).
func subscribed(tr *tier, n int64) func() bool {
	return func() bool { return tr.client.PubSubNumSub(context.Background(), tr.r.feed).Val()[tr.r.feed] == n }
}

// heard tells whether tr's replica has counted n feed changes (applied or
// old).
func heard(tr *tier, n float64) func() bool {
	return func() bool {
		return testutil.ToFloat64(tr.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied))+
			testutil.ToFloat64(tr.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeOld)) >= n
	}
}

// Callback E sets A, a portrait_set then sets B, callback E is delivered
// again: every tier keeps B (the repeat is recognised as old even though
// the set came within the clock skew of E).
func TestRepeatedCallbackNeverUndoesLaterSet(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	a, _, trA := newReplica(t, &up, srv.URL())
	b, _, trB := newReplica(t, &up, srv.URL())
	wait.For(t, 5*time.Second, "2 feed subscribers", subscribed(trB, 2))
	e := time.Now().UnixMilli()
	cb := []im.ProfileItem{{Tag: nick, Value: raw("A")}}
	if err := a.Change(context.Background(), "u9", cb, cache.FromCallback, e, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := a.Change(context.Background(), "u9", []im.ProfileItem{{Tag: nick, Value: raw("B")}}, cache.FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	// b has heard of A and of the set. (A repeat that reaches b within the
	// feed's delay of a set made on another replica, before b hears of it,
	// is not covered: b orders the two by their arrival there.)
	wait.For(t, 5*time.Second, "2 feed changes at the replica", heard(trB, 2))
	for _, c := range []*cache.Cache{a, b} { // the repeat reaches either replica
		if err := c.Change(context.Background(), "u9", cb, cache.FromCallback, e, time.Now().Add(10*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	wait.For(t, 5*time.Second, "3 feed changes at the replica", heard(trB, 3))
	for i, c := range []*cache.Cache{a, b} {
		if got := nickOf(t, c, "u9"); got != "B" {
			t.Fatalf("replica %d serves %q after a repeated callback", i, got)
		}
	}
	got, _ := trA.r.Get(context.Background(), []string{"u9"}, []string{nick})
	if v, _ := got[0].Tag(nick); string(v.Value) != `"B"` {
		t.Fatalf("Redis holds %s", v.Value)
	}
	if up.calls.Load() != 0 {
		t.Fatalf("%d upstream calls", up.calls.Load())
	}
}

// An unsigned callback (Drop) creates nothing: no Redis key, no field, no
// in-process entry on any replica, no longer key life; it only drops tags
// already cached.
func TestDropCreatesNothing(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	a, localA, trA := newReplica(t, &up, srv.URL())
	_, localB, trB := newReplica(t, &up, srv.URL())
	wait.For(t, 5*time.Second, "2 feed subscribers", subscribed(trB, 2))
	custom := func(i int) string { return "Tag_Profile_Custom_T" + strings.Repeat("x", i%7) }
	var tags []string
	for i := range 7 {
		tags = append(tags, custom(i))
	}
	for i := range 50 { // forged callbacks for accounts nobody cached
		if err := a.Drop(context.Background(), "ghost"+string(rune('a'+i%26))+string(rune('a'+i/26)), tags, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	wait.For(t, 5*time.Second, "50 feed changes at the replica", heard(trB, 50))
	if n, _ := srv.Do("DBSIZE"); n != "0" {
		t.Fatalf("forged drops created %s Redis keys", n)
	}
	if localA.Len() != 0 || localB.Len() != 0 {
		t.Fatalf("forged drops created %d + %d in-process entries", localA.Len(), localB.Len())
	}

	// A cached account: only the cached tag is dropped, the key's TTL is
	// not extended, no other field appears.
	if got := nickOf(t, a, "u5"); got != "u5:"+nick+":0" {
		t.Fatalf("fetched %q", got)
	}
	wait.For(t, 5*time.Second, writeBack("u5"), written(trA, "u5"))
	if _, err := srv.Do("PEXPIRE", trA.r.Key("u5"), "60000"); err != nil {
		t.Fatal(err)
	}
	if err := a.Drop(context.Background(), "u5", append([]string{nick}, tags...), time.Now()); err != nil {
		t.Fatal(err)
	}
	if n, _ := srv.Do("HLEN", trA.r.Key("u5")); n != "1" {
		t.Fatalf("hash has %s fields after the drop, want 1", n)
	}
	if ttl, _ := srv.Do("PTTL", trA.r.Key("u5")); len(ttl) > 5 { // at most 60000 ms
		t.Fatalf("the drop extended the key's life to %s ms", ttl)
	}
	if rec := localA.Get("u5", time.Now()); rec == nil || len(rec.Tags) != 1 || rec.Serves([]string{nick}, time.Now()) != cache.StateMiss {
		t.Fatalf("in-process record after the drop: %+v", rec)
	}
	before := up.calls.Load()
	nickOf(t, a, "u5")
	if up.calls.Load() != before+1 {
		t.Fatal("the dropped tag was not fetched again")
	}
}

// One PUBLISH with a far-future version, EventTime and freshness cannot
// make a replica serve its value past a later change or past the local
// TTLs: what a feed message claims is bounded on arrival.
func TestFeedClaimsBounded(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	clk := &clock{now: time.Now()}
	local := cache.NewLocal(0)
	var up fakeUpstream
	c, err := cache.New(cache.Config{Loader: &up, Local: local, Remote: tr.r, Metrics: tr.m, Now: clk.Now, TTL: time.Minute, StaleTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	wait.For(t, 5*time.Second, "1 feed subscriber", subscribed(tr, 1))
	far := clk.Now().AddDate(10, 0, 0)
	poison := &cache.Record{Tags: []cache.TagValue{{Tag: nick, Value: raw("poison"), Set: true, Origin: cache.FromCallback,
		Ver: far.UnixMilli(), Event: far.UnixMilli(), Fresh: far, Stale: far}}}
	if err := tr.client.Publish(context.Background(), tr.r.feed, encodeChange("attacker", clk.Now(), "u7", poison)).Err(); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "1 feed change at the replica", heard(tr, 1))
	now := clk.Now()
	v, ok := local.Get("u7", now).Tag(nick)
	if !ok || v.Ver > now.Add(time.Second).UnixMilli() || v.Event > now.Add(time.Second).UnixMilli() ||
		v.Fresh.After(now.Add(time.Minute)) || v.Stale.After(now.Add(time.Minute+time.Hour)) {
		t.Fatalf("the feed's claims were kept: %+v", v)
	}
	clk.Add(2 * time.Second) // past the clock skew: a real change wins
	if err := c.Change(context.Background(), "u7", []im.ProfileItem{{Tag: nick, Value: raw("real")}}, cache.FromSet, 0, clk.Now()); err != nil {
		t.Fatal(err)
	}
	if got := nickOf(t, c, "u7"); got != "real" {
		t.Fatalf("after a portrait_set the replica serves %q", got)
	}
}

// A Redis-tier answer is never older than what the replica holds: the
// replica knows a newer Nick (its Redis write failed), the request also
// asks a tag only Redis has, and the answer carries the newer Nick.
func TestRedisAnswerFromMergedRecord(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	c, local, tr := newReplica(t, &up, srv.URL())
	now := time.Now()
	level := "Tag_Profile_IM_Level"
	older := &cache.Record{Tags: []cache.TagValue{
		{Tag: nick, Value: raw("old"), Set: true, Origin: cache.FromFetch, Ver: now.Add(-time.Minute).UnixMilli(), Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
		{Tag: level, Value: raw("7"), Set: true, Origin: cache.FromFetch, Ver: now.Add(-time.Minute).UnixMilli(), Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
	}}
	tr.r.flush([]write{{"u8", older}})
	local.Merge("u8", &cache.Record{Tags: []cache.TagValue{{Tag: nick, Value: raw("new"), Set: true, Origin: cache.FromSet, Ver: now.UnixMilli(),
		Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}}}, now)
	a := c.Get(context.Background(), []string{"u8"}, []string{nick, level})[0]
	if a.Err != nil || a.Source != cache.SourceRemote {
		t.Fatalf("answer %+v", a)
	}
	if got := values(a.Item); len(got) != 2 || got[0] != nick+"=new" || got[1] != level+"=7" {
		t.Fatalf("answered %v, want the replica's newer Nick and Redis's Level", got)
	}
	if up.calls.Load() != 0 {
		t.Fatalf("%d upstream calls", up.calls.Load())
	}
}

// A key of another type at a record's name (any Redis client can SET one)
// is a miss for that account only: the tier stays up, other accounts are
// served from it, writes to that key are skipped.
func TestWrongTypeKeyIsAMissForThatKeyOnly(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	c, _, tr := newReplica(t, &up, srv.URL())
	nickOf(t, c, "good") // fetched, written back
	wait.For(t, 5*time.Second, writeBack("good"), written(tr, "good"))
	if _, err := srv.Do("SET", tr.r.Key("bad"), "not a hash"); err != nil {
		t.Fatal(err)
	}
	other, _, _ := newReplica(t, &up, srv.URL()) // an empty in-process tier
	before := up.calls.Load()
	for i := range 3 {
		as := other.Get(context.Background(), []string{"good", "bad"}, []string{nick})
		if as[0].Err != nil || as[1].Err != nil || (i == 0 && (as[0].Source != cache.SourceRemote || as[1].Source != cache.SourceUpstream)) {
			t.Fatalf("answers %+v", as)
		}
		tr.r.flush([]write{{"bad", testRecord("bad", time.Now())}, {"good2", testRecord("good2", time.Now())}})
	}
	if !tr.r.Up() {
		t.Fatal("one key of another type took the Redis tier down")
	}
	if n := up.calls.Load() - before; n != 1 { // "bad" once; then the replica holds it
		t.Fatalf("%d upstream calls, want 1", n)
	}
	if n := testutil.ToFloat64(tr.m.RedisErrors.WithLabelValues("wrongtype")); n == 0 {
		t.Fatal("not counted")
	}
	if got, _ := tr.r.Get(context.Background(), []string{"good2"}, []string{nick}); got[0] == nil {
		t.Fatal("a write in the same pipeline as the bad key was lost")
	}
	// Claims too.
	owned, _, err := tr.r.Claim(context.Background(), "bad", []string{nick})
	if err != nil || !owned || !tr.r.Up() {
		t.Fatalf("claim on the bad key: owned %v, %v, up %v", owned, err, tr.r.Up())
	}
}

// After a feed cut the in-process tier is cleared (changes may have been
// missed); a fetch sent before the cut and answered after the clear does
// not put its value back.
func TestLateFetchAfterFeedClearNotReinstated(t *testing.T) {
	srv := redistest.Start(t)
	g := &gate{started: make(chan struct{}), release: make(chan string)}
	c, local, tr := newReplica(t, g, srv.URL())
	wait.For(t, 5*time.Second, "1 feed subscriber", subscribed(tr, 1))
	local.Merge("marker", testRecord("marker", time.Now()), time.Now())
	done := make(chan string)
	go func() { done <- nickOf(t, c, "u1") }()
	<-g.started
	srv.Kill() // a change made now is missed
	srv.Restart()
	wait.For(t, 10*time.Second, "the in-process tier cleared after the feed cut", func() bool { return local.Len() == 0 })
	g.release <- "old"
	<-done
	if rec := local.Get("u1", time.Now()); rec != nil {
		v, _ := rec.Tag(nick)
		t.Fatalf("a fetch sent before the feed cut put %s into the cleared tier", v.Value)
	}
}

// Imported and Deleted through one replica reach another replica's
// in-process tier and Redis: "not found" dropped after an import, profile
// replaced by "not found" after a deletion, nothing fetched for it.
func TestLifecycleAcrossReplicas(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	a, _, _ := newReplica(t, &up, srv.URL())
	b, localB, trB := newReplica(t, &up, srv.URL())
	wait.For(t, 5*time.Second, "2 feed subscribers", subscribed(trB, 2))
	ctx := context.Background()
	if ans := b.Get(ctx, []string{"ghost"}, []string{nick}); ans[0].Item.ResultCode != 40003 {
		t.Fatalf("ghost: %+v", ans[0])
	}
	if err := a.Imported(ctx, []string{"ghost"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "the import at the other replica's in-process tier", func() bool {
		return localB.Get("ghost", time.Now()).Serves([]string{nick}, time.Now()) == cache.StateMiss
	})
	nickOf(t, b, "u1")
	calls := up.calls.Load()
	if err := a.Deleted(ctx, []string{"u1"}, time.Now(), true); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "the deletion at the other replica's in-process tier", func() bool {
		return localB.Get("u1", time.Now()).Serves([]string{nick}, time.Now()) == cache.StateNotFound
	})
	if ans := b.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != 40003 || up.calls.Load() != calls {
		t.Fatalf("deleted u1: %+v, %d fetches", ans[0], up.calls.Load()-calls)
	}
	// A fresh replica finds the deletion in Redis.
	c, _, _ := newReplica(t, &up, srv.URL())
	if ans := c.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != 40003 || up.calls.Load() != calls {
		t.Fatalf("deleted u1 on a new replica: %+v", ans[0])
	}
}

// A change older than a known deletion (a change callback for a
// portrait_set made before the account_delete, arriving after it; or a
// portrait_set answered on another replica just before the deletion whose
// write lands after it) must not clear the negative entry and bring the
// deleted account's profile back, in Go (merge) or in Redis (writeScript).
func TestChangeOlderThanDeletionKeepsNotFound(t *testing.T) {
	for _, origin := range []cache.Origin{cache.FromCallback, cache.FromSet} {
		srv := redistest.Start(t)
		var up fakeUpstream
		a, _, _ := newReplica(t, &up, srv.URL())
		b, localB, trB := newReplica(t, &up, srv.URL())
		wait.For(t, 5*time.Second, "2 feed subscribers", subscribed(trB, 2))
		ctx := context.Background()
		nickOf(t, b, "u1")
		at := time.Now()
		if err := a.Deleted(ctx, []string{"u1"}, at, true); err != nil {
			t.Fatal(err)
		}
		wait.For(t, 5*time.Second, "the deletion at the other replica's in-process tier", func() bool {
			return localB.Get("u1", time.Now()).Serves([]string{nick}, time.Now()) == cache.StateNotFound
		})
		// The change happened 200 ms before the deletion.
		old := at.Add(-200 * time.Millisecond)
		if err := b.Change(ctx, "u1", []im.ProfileItem{{Tag: nick, Value: raw("before delete")}}, origin, old.UnixMilli(), time.Now().Add(-200*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		calls := up.calls.Load()
		c, _, _ := newReplica(t, &up, srv.URL()) // a fresh replica reads Redis
		for name, cc := range map[string]*cache.Cache{"b (in-process)": b, "c (Redis)": c} {
			if ans := cc.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != im.CodeAccountNotFound {
				t.Errorf("origin %d, replica %s: deleted account served again: %+v (fetches %d)", origin, name, ans[0].Item, up.calls.Load()-calls)
			}
		}
	}
}

// classLoader plays the upstream's "no data" answers: "nostd" holds no
// standard data (40807 when a standard tag is asked), "nocustom" no custom
// data (40809), "ghost" does not exist (40003); other tags are "<tag>".
type classLoader struct {
	admitAll
	calls atomic.Int32
}

func (l *classLoader) Load(_ context.Context, lk cache.Lookup) (cache.Fetched, error) {
	account, tags := lk.Account, lk.Tags
	l.calls.Add(1)
	it := im.UserProfile{ToAccount: account}
	cls := im.ClassesOf(tags)
	switch {
	case account == "ghost":
		it.ResultCode, it.ResultInfo = 40003, "no such account"
	case account == "nostd" && cls&im.ClassStandard != 0:
		it.ResultCode, it.ResultInfo = 40807, "no standard data"
	case account == "nocustom" && cls&im.ClassCustom != 0:
		it.ResultCode, it.ResultInfo = 40809, "no custom data"
	default:
		for _, t := range tags {
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: raw(t)})
		}
	}
	return cache.Fetched{Tags: tags, Item: it, Sent: time.Now()}, nil
}

type lookupCase struct {
	account string
	tags    []string
	code    int // 0: the tags' values
	calls   int32
}

func checkLookups(t *testing.T, c *cache.Cache, l *classLoader, cases []lookupCase) {
	t.Helper()
	for i, tc := range cases {
		before := l.calls.Load()
		a := c.Get(context.Background(), []string{tc.account}, tc.tags)[0]
		if a.Err != nil || a.Item.ResultCode != tc.code || (tc.code == 0 && len(a.Item.ProfileItem) != len(tc.tags)) {
			t.Fatalf("step %d %s %v: %+v %v, want code %d", i, tc.account, tc.tags, a.Item, a.Err, tc.code)
		}
		if got := l.calls.Load() - before; got != tc.calls {
			t.Fatalf("step %d %s %v: %d upstream calls, want %d", i, tc.account, tc.tags, got, tc.calls)
		}
	}
}

const customTag = "Tag_Profile_Custom_Test"

// TestRedisNoDataPerClass: through a real Redis (the write script orders
// markers like any field), a replica that never called the upstream serves
// what another learned: 40809 for customTag tags, the standard value for
// standard ones; and neither becomes account-wide.
func TestRedisNoDataPerClass(t *testing.T) {
	srv := redistest.Start(t)
	trA, trB := startTier(t, srv.URL(), 1), startTier(t, srv.URL(), 1)
	la, lb := &classLoader{}, &classLoader{}
	ca, err := cache.New(cache.Config{Loader: la, Remote: trA.r, Metrics: trA.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Close)
	cb, err := cache.New(cache.Config{Loader: lb, Remote: trB.r, Metrics: trB.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cb.Close)
	checkLookups(t, ca, la, []lookupCase{
		{"nocustom", []string{nick}, 0, 1},
		{"nocustom", []string{customTag}, 40809, 1},
		{"nostd", []string{customTag}, 0, 1},
		{"nostd", []string{nick}, 40807, 1},
	})
	// Write-backs are queued: wait until B sees all four.
	wait.For(t, 5*time.Second, "B to see A's four entries", func() bool {
		recs, _ := trB.r.Get(context.Background(), []string{"nocustom", "nostd"}, []string{nick, customTag})
		return recs[0].Serves([]string{customTag}, time.Now()) == cache.StateNotFound && recs[1].Serves([]string{nick}, time.Now()) == cache.StateNotFound &&
			recs[0].Serves([]string{nick}, time.Now()) == cache.StateFresh && recs[1].Serves([]string{customTag}, time.Now()) == cache.StateFresh
	})
	checkLookups(t, cb, lb, []lookupCase{
		{"nocustom", []string{nick}, 0, 0},
		{"nocustom", []string{customTag}, 40809, 0},
		{"nostd", []string{customTag}, 0, 0},
		{"nostd", []string{nick}, 40807, 0},
	})
	// The script keeps the newer of a marker and a value of its class.
	ctx := context.Background()
	now := time.Now()
	v := cache.TagValue{Tag: nick, Value: json.RawMessage(`"n"`), Set: true, Ver: now.UnixMilli() + 10_000, Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}
	trA.r.Put(ctx, []string{"nostd"}, []*cache.Record{{Tags: []cache.TagValue{v}}})
	wait.For(t, 5*time.Second, "a value newer than the marker to be served", func() bool {
		recs, _ := trB.r.Get(ctx, []string{"nostd"}, []string{nick})
		it := recs[0].Answer("nostd", []string{nick}, time.Now())
		return it.ResultCode == 0 && len(it.ProfileItem) == 1
	})
}

// flipLoader answers 40807 for standard tags until hasStd is set, then
// the tags unset (the account now holds standard data).
type flipLoader struct {
	admitAll
	calls  atomic.Int32
	hasStd atomic.Bool
}

func (l *flipLoader) Load(_ context.Context, lk cache.Lookup) (cache.Fetched, error) {
	account, tags := lk.Account, lk.Tags
	l.calls.Add(1)
	it := im.UserProfile{ToAccount: account}
	if !l.hasStd.Load() && im.ClassesOf(tags)&im.ClassStandard != 0 {
		it.ResultCode, it.ResultInfo = 40807, "no standard data"
	}
	return cache.Fetched{Tags: tags, Item: it, Sent: time.Now()}, nil
}

// TestNoDataEntryClearedBySetOfItsClass: a portrait_set of a standard tag
// (through a real Redis) ends the account's "no standard data" entry, so
// another standard tag is fetched, not answered 40807.
func TestNoDataEntryClearedBySetOfItsClass(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1)
	l := &flipLoader{}
	c, err := cache.New(cache.Config{Loader: l, Remote: tr.r, Metrics: tr.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()
	if a := c.Get(ctx, []string{"acct"}, []string{nick})[0]; a.Item.ResultCode != 40807 {
		t.Fatalf("first lookup: %+v", a)
	}
	wait.For(t, 5*time.Second, writeBack("acct"), written(tr, "acct"))
	time.Sleep(5 * time.Millisecond) // versions are ms: the set must be newer than the marker, not equal
	l.hasStd.Store(true)
	if err := c.Change(ctx, "acct", []im.ProfileItem{{Tag: nick, Value: raw("n")}}, cache.FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	if a := c.Get(ctx, []string{"acct"}, []string{nick})[0]; a.Item.ResultCode != 0 {
		t.Fatalf("the set nickname: %+v", a.Item)
	}
	// Another replica, which only reads Redis, and then this one.
	tr2 := startTier(t, srv.URL(), 1)
	c2, err := cache.New(cache.Config{Loader: l, Remote: tr2.r, Metrics: tr2.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c2.Close)
	for i, c := range []*cache.Cache{c2, c} {
		a := c.Get(ctx, []string{"acct"}, []string{"Tag_Profile_IM_Gender"})[0]
		if a.Item.ResultCode != 0 {
			t.Fatalf("replica %d: after a portrait_set of a standard tag, another standard tag answered %d %q (source %s)",
				i, a.Item.ResultCode, a.Item.ResultInfo, a.Source)
		}
	}
}

// clock is a settable time source.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

func raw(s string) json.RawMessage { b, _ := json.Marshal(s); return b }

func item(a string, kv ...string) im.UserProfile {
	it := im.UserProfile{ToAccount: a}
	for i := 0; i+1 < len(kv); i += 2 {
		it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: kv[i], Value: raw(kv[i+1])})
	}
	return it
}

// fakeUpstream serves "<account>:<tag>:<version>" for every tag except
// Tag_Profile_IM_Location (unset), ghost accounts (40003) and failures
// injected through fail.
type fakeUpstream struct {
	admitAll
	calls   atomic.Int32
	version atomic.Int32
	fail    atomic.Pointer[error]
}

func (f *fakeUpstream) Load(ctx context.Context, lk cache.Lookup) (cache.Fetched, error) {
	account, tags := lk.Account, lk.Tags
	f.calls.Add(1)
	if e := f.fail.Load(); e != nil {
		return cache.Fetched{}, *e
	}
	if account == "ghost" {
		return cache.Fetched{Tags: tags, Item: im.UserProfile{ToAccount: account, ResultCode: 40003, ResultInfo: "no such account"}}, nil
	}
	it := im.UserProfile{ToAccount: account}
	for _, t := range tags {
		if t != "Tag_Profile_IM_Location" {
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: raw(fmt.Sprintf("%s:%s:%d", account, t, f.version.Load()))})
		}
	}
	return cache.Fetched{Tags: tags, Item: it}, nil
}

func values(it im.UserProfile) []string {
	var out []string
	for _, p := range it.ProfileItem {
		var s string
		json.Unmarshal(p.Value, &s)
		out = append(out, p.Tag+"="+s)
	}
	return out
}

// admitAll is the admission part of a fake Loader: every request admitted,
// nothing to promote (a copy of cache's test helper).
type admitAll struct{}

func (admitAll) Admit(int, time.Time, bool) (cache.Ticket, error) { return nil, nil }
func (admitAll) Promote(string)                                   {}
