package cache

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

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
	cb := []upstream.ProfileItem{{Tag: nick, Value: raw("A")}}
	if err := a.Change(context.Background(), "u9", cb, FromCallback, e, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := a.Change(context.Background(), "u9", []upstream.ProfileItem{{Tag: nick, Value: raw("B")}}, FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
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
	if err := c.Change(context.Background(), "u7", []upstream.ProfileItem{{Tag: nick, Value: raw("real")}}, FromSet, 0, clk.Now()); err != nil {
		t.Fatal(err)
	}
	if got := nickOf(t, c, "u7"); got != "real" {
		t.Fatalf("after a portrait_set the replica serves %q", got)
	}
}
