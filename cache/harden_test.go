package cache

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// waitFeed waits until tr's replica has counted n feed changes (applied or
// old).
func waitFeed(t *testing.T, tr *tier, n float64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(tr.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied))+
		testutil.ToFloat64(tr.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeOld)) < n {
		if time.Now().After(deadline) {
			t.Fatalf("replica never heard of %v feed changes", n)
		}
		time.Sleep(time.Millisecond)
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
	waitSubscribed(t, trB, 2)
	e := time.Now().UnixMilli()
	cb := []im.ProfileItem{{Tag: nick, Value: raw("A")}}
	if err := a.Change(context.Background(), "u9", cb, FromCallback, e, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := a.Change(context.Background(), "u9", []im.ProfileItem{{Tag: nick, Value: raw("B")}}, FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	// b has heard of A and of the set. (A repeat that reaches b within the
	// feed's delay of a set made on another replica, before b hears of it,
	// is not covered: b orders the two by their arrival there.)
	waitFeed(t, trB, 2)
	for _, c := range []*Cache{a, b} { // the repeat reaches either replica
		if err := c.Change(context.Background(), "u9", cb, FromCallback, e, time.Now().Add(10*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	waitFeed(t, trB, 3)
	for i, c := range []*Cache{a, b} {
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
	waitSubscribed(t, trB, 2)
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
	waitFeed(t, trB, 50)
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
	waitWritten(t, trA, "u5")
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
	if rec := localA.Get("u5", time.Now()); rec == nil || len(rec.Tags) != 1 || rec.state([]string{nick}, time.Now()) != stateMiss {
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
	local := NewLocal(0)
	var up fakeUpstream
	c, err := New(Config{Loader: &up, Local: local, Remote: tr.r, Metrics: tr.m, Now: clk.Now, TTL: time.Minute, StaleTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	waitSubscribed(t, tr, 1)
	far := clk.Now().AddDate(10, 0, 0)
	poison := &Record{Tags: []TagValue{{Tag: nick, Value: raw("poison"), Set: true, Origin: FromCallback,
		Ver: far.UnixMilli(), Event: far.UnixMilli(), Fresh: far, Stale: far}}}
	if err := tr.client.Publish(context.Background(), tr.r.feed, encodeChange("attacker", clk.Now(), "u7", poison)).Err(); err != nil {
		t.Fatal(err)
	}
	waitFeed(t, tr, 1)
	now := clk.Now()
	v, ok := local.Get("u7", now).Tag(nick)
	if !ok || v.Ver > now.Add(time.Second).UnixMilli() || v.Event > now.Add(time.Second).UnixMilli() ||
		v.Fresh.After(now.Add(time.Minute)) || v.Stale.After(now.Add(time.Minute+time.Hour)) {
		t.Fatalf("the feed's claims were kept: %+v", v)
	}
	clk.Add(2 * time.Second) // past the clock skew: a real change wins
	if err := c.Change(context.Background(), "u7", []im.ProfileItem{{Tag: nick, Value: raw("real")}}, FromSet, 0, clk.Now()); err != nil {
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
	older := &Record{Tags: []TagValue{
		{Tag: nick, Value: raw("old"), Set: true, Origin: FromFetch, Ver: now.Add(-time.Minute).UnixMilli(), Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
		{Tag: level, Value: raw("7"), Set: true, Origin: FromFetch, Ver: now.Add(-time.Minute).UnixMilli(), Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)},
	}}
	tr.r.flush([]write{{"u8", older}})
	local.Merge("u8", &Record{Tags: []TagValue{{Tag: nick, Value: raw("new"), Set: true, Origin: FromSet, Ver: now.UnixMilli(),
		Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}}}, now)
	a := c.Get(context.Background(), []string{"u8"}, []string{nick, level})[0]
	if a.Err != nil || a.Source != SourceRemote {
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
	waitWritten(t, tr, "good")
	if _, err := srv.Do("SET", tr.r.Key("bad"), "not a hash"); err != nil {
		t.Fatal(err)
	}
	other, _, _ := newReplica(t, &up, srv.URL()) // an empty in-process tier
	before := up.calls.Load()
	for i := range 3 {
		as := other.Get(context.Background(), []string{"good", "bad"}, []string{nick})
		if as[0].Err != nil || as[1].Err != nil || (i == 0 && (as[0].Source != SourceRemote || as[1].Source != SourceUpstream)) {
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

// A failed background refresh leaves a backoff mark; once the backoff is
// over the mark is forgotten, so the map does not grow with every account
// that ever failed.
func TestFailedRefreshMarksExpire(t *testing.T) {
	up := &fakeUpstream{}
	clk := newClock()
	c, err := New(Config{Loader: up, TTL: time.Minute, StaleTTL: time.Hour, RefreshBackoff: 20 * time.Millisecond, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	tags := []string{nick}
	var accounts []string
	for i := range 50 {
		accounts = append(accounts, "r"+strings.Repeat("x", i))
	}
	c.Get(context.Background(), accounts, tags)
	fail := error(&upstream.Error{Kind: im.KindHTTP, Status: 502})
	up.fail.Store(&fail)
	clk.Add(2 * time.Minute) // stale: every lookup starts a refresh, which fails
	c.Get(context.Background(), accounts, tags)
	c.bg.Wait()
	marks := func() int {
		n := 0
		c.refreshing.Range(func(k, v any) bool { n++; return true })
		return n
	}
	if n := marks(); n != len(accounts) {
		t.Fatalf("%d backoff marks, want %d", n, len(accounts))
	}
	clk.Add(time.Second) // the backoff is over
	deadline := time.Now().Add(5 * time.Second)
	for marks() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d marks kept after their backoff", marks())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A fetch sent before a change and answered after the account's record
// left the in-process tier (evicted) does not put the old value back.
func TestLateFetchAfterEvictionNotReinstated(t *testing.T) {
	g := &gate{started: make(chan struct{}), release: make(chan string)}
	local := NewLocal(0)
	c, err := New(Config{Loader: g, Local: local})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	done := make(chan string)
	go func() { done <- nickOf(t, c, "u1") }()
	<-g.started
	if err := c.Change(context.Background(), "u1", []im.ProfileItem{{Tag: nick, Value: raw("new")}}, FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	local.Delete("u1") // evicted
	g.release <- "old"
	<-done
	if rec := local.Get("u1", time.Now()); rec != nil {
		v, _ := rec.Tag(nick)
		t.Fatalf("the late fetch put %s back", v.Value)
	}
	// A fetch sent after the change (and the skew) is stored again.
	time.Sleep(1100 * time.Millisecond)
	go func() { done <- nickOf(t, c, "u1") }()
	<-g.started
	g.release <- "new"
	<-done
	if local.Get("u1", time.Now()) == nil {
		t.Fatal("a fetch sent after the change was not stored")
	}
}

// After a feed cut the in-process tier is cleared (changes may have been
// missed); a fetch sent before the cut and answered after the clear does
// not put its value back.
func TestLateFetchAfterFeedClearNotReinstated(t *testing.T) {
	srv := redistest.Start(t)
	g := &gate{started: make(chan struct{}), release: make(chan string)}
	c, local, tr := newReplica(t, g, srv.URL())
	waitSubscribed(t, tr, 1)
	local.Merge("marker", testRecord("marker", time.Now()), time.Now())
	done := make(chan string)
	go func() { done <- nickOf(t, c, "u1") }()
	<-g.started
	srv.Kill() // a change made now is missed
	srv.Restart()
	deadline := time.Now().Add(10 * time.Second)
	for local.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the in-process tier was not cleared after the feed cut")
		}
		time.Sleep(5 * time.Millisecond)
	}
	g.release <- "old"
	<-done
	if rec := local.Get("u1", time.Now()); rec != nil {
		v, _ := rec.Tag(nick)
		t.Fatalf("a fetch sent before the feed cut put %s into the cleared tier", v.Value)
	}
}
