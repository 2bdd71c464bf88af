package cache

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

const nick = "Tag_Profile_IM_Nick"

func TestSupersedes(t *testing.T) {
	const skew = 1000
	fetch := func(ver int64) TagValue { return TagValue{Origin: FromFetch, Ver: ver} }
	set := func(ver int64) TagValue { return TagValue{Origin: FromSet, Ver: ver} }
	cb := func(event, ver int64) TagValue { return TagValue{Origin: FromCallback, Event: event, Ver: ver} }
	cases := []struct {
		name     string
		upd, old TagValue
		want     bool
	}{
		{"later fetch over fetch", fetch(10_000), fetch(9_000), true},
		{"same-time fetch over fetch", fetch(10_000), fetch(10_000), true},
		{"older fetch over fetch", fetch(9_000), fetch(10_000), false},
		{"fetch sent before a set", fetch(9_999), set(10_000), false},
		{"fetch sent just after a set (within skew)", fetch(10_500), set(10_000), false},
		{"fetch sent well after a set", fetch(11_000), set(10_000), true},
		{"fetch sent before a callback arrived", fetch(9_000), cb(8_000, 10_000), false},
		{"fetch sent well after a callback arrived", fetch(11_500), cb(8_000, 10_000), true},
		{"set over an older fetch", set(10_000), fetch(9_000), true},
		{"set over a newer fetch", set(9_000), fetch(10_000), false},
		{"set over a callback that arrived before", set(10_000), cb(9_000, 9_500), true},
		{"newer callback over callback", cb(200, 5), cb(100, 10_000), true},
		{"repeated callback", cb(100, 20_000), cb(100, 10_000), true},
		{"older callback over callback", cb(100, 20_000), cb(200, 10_000), false},
		{"callback over a fetch sent before it (by the clocks)", cb(10_000, 12_000), fetch(10_500), true},
		{"callback long before a fetch", cb(5_000, 12_000), fetch(10_000), false},
		{"callback older than the tag's newest event", cb(100, 12_000), TagValue{Origin: FromFetch, Ver: 0, Event: 200}, false},
		{"callback long before a set", cb(5_000, 12_000), set(10_000), false},
		{"repeat of a callback over a set that followed it", cb(10_000, 10_300), TagValue{Origin: FromSet, Ver: 10_200, Event: 10_000}, false},
		{"repeat of a callback over a fetch that followed it", cb(10_000, 10_300), TagValue{Origin: FromFetch, Ver: 10_100, Event: 10_000}, false},
		{"repeat of a callback over an invalidation", cb(10_000, 10_300), TagValue{Origin: FromInvalidate, Ver: 10_200, Event: 10_000}, false},
		{"newer callback over a set that followed the last one", cb(10_001, 10_300), TagValue{Origin: FromSet, Ver: 10_200, Event: 10_000}, true},
		{"invalidation over a set answered before it", TagValue{Origin: FromInvalidate, Ver: 10_500}, set(10_000), true},
		{"invalidation over a callback that arrived after it", TagValue{Origin: FromInvalidate, Ver: 10_500}, cb(9_000, 11_000), false},
		{"fetch sent just after an invalidation (within skew)", fetch(10_501), TagValue{Origin: FromInvalidate, Ver: 10_500}, false},
		{"fetch sent well after an invalidation", fetch(11_500), TagValue{Origin: FromInvalidate, Ver: 10_500}, true},
		{"fetch sent before an invalidation", fetch(10_499), TagValue{Origin: FromInvalidate, Ver: 10_500}, false},
	}
	for _, c := range cases {
		if got := supersedes(&c.upd, &c.old, skew); got != c.want {
			t.Errorf("%s: supersedes = %v, want %v", c.name, got, c.want)
		}
	}
}

// randomWrite is one write as the cache makes them: a fetch (tags or a
// negative entry), a set or a callback, with versions drawn from a narrow
// range so that every rule is hit often.
func randomWrite(rng *rand.Rand, now time.Time, i int) *Record {
	fresh := now.Add(time.Duration(rng.IntN(100)) * time.Second).Truncate(time.Millisecond)
	stale := fresh.Add(time.Hour)
	ver := int64(1_700_000_000_000 + rng.IntN(3_000))
	if rng.IntN(8) == 0 {
		return &Record{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: fresh, NotFoundVer: ver}
	}
	if rng.IntN(6) == 0 { // a class's "no data" entry (40807/40809)
		return noDataRecord(im.TagClass(1+rng.IntN(2)), "none", ver, fresh)
	}
	rec := &Record{}
	origin := Origin(rng.IntN(4))
	var event int64
	if origin == FromCallback {
		event = int64(1_700_000_000_000 + rng.IntN(3_000))
		if rng.IntN(2) == 0 { // one of a few: exact repeats of a callback happen often
			event = int64(1_700_000_000_000 + 1_000*rng.IntN(3))
		}
	}
	for _, tag := range []string{nick, "Tag_Profile_IM_Level", customTag} {
		if rng.IntN(3) == 0 {
			continue
		}
		v := TagValue{Tag: tag, Origin: origin, Ver: ver, Event: event, Fresh: fresh, Stale: stale}
		if rng.IntN(4) != 0 {
			v.Set, v.Value = true, json.RawMessage(fmt.Sprintf(`"w%d"`, i))
		}
		rec.put(v)
	}
	return rec
}

func sameRecord(a, b *Record, tags []string) string {
	if a != nil && len(a.Tags) == 0 && a.NotFoundCode == 0 {
		a = nil // an empty write: nothing stored
	}
	if (a == nil) != (b == nil) {
		return fmt.Sprintf("one is nil: %v / %v", a, b)
	}
	if a == nil {
		return ""
	}
	if a.NotFoundCode != b.NotFoundCode || a.NotFoundVer != b.NotFoundVer || a.NotFoundInfo != b.NotFoundInfo ||
		!a.NotFoundUntil.Equal(b.NotFoundUntil) {
		return fmt.Sprintf("negative entries differ: %+v / %+v", *a, *b)
	}
	for _, tag := range tags {
		x, okx := a.Tag(tag)
		y, oky := b.Tag(tag)
		if okx != oky || x.Set != y.Set || x.Origin != y.Origin || x.Ver != y.Ver || x.Event != y.Event ||
			!bytes.Equal(x.Value, y.Value) || !x.Fresh.Equal(y.Fresh) || !x.Stale.Equal(y.Stale) {
			return fmt.Sprintf("%s differs: %+v (%v) / %+v (%v)", tag, x, okx, y, oky)
		}
	}
	return ""
}

// The Redis write script and merge implement the same rules: random write
// sequences leave the same record in both.
func TestWriteScriptMatchesMerge(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	rng := rand.New(rand.NewPCG(7, 9))
	now := time.Now()
	tags := []string{nick, "Tag_Profile_IM_Level", customTag}
	entries := append(slices.Clone(tags), markerStd, markerCustom)
	// Sequences that random draws rarely make: a callback, a later write of
	// another origin within the skew, the same callback again.
	fresh, stale := now.Add(time.Minute).Truncate(time.Millisecond), now.Add(time.Hour).Truncate(time.Millisecond)
	tv := func(o Origin, ver, event int64, v string) *Record {
		return &Record{Tags: []TagValue{{Tag: nick, Value: raw(v), Set: true, Origin: o, Ver: ver, Event: event, Fresh: fresh, Stale: stale}}}
	}
	neg := func(ver int64) *Record {
		return &Record{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: fresh, NotFoundVer: ver}
	}
	const e = 1_700_000_000_000
	scripted := [][]*Record{
		{tv(FromCallback, e+100, e, "A"), tv(FromSet, e+200, 0, "B"), tv(FromCallback, e+300, e, "A")},
		{tv(FromCallback, e+100, e, "A"), tv(FromFetch, e+1200, 0, "B"), tv(FromCallback, e+1300, e, "A")},
		{tv(FromCallback, e+100, e, "A"), tv(FromInvalidate, e+200, 0, ""), tv(FromCallback, e+300, e, "A")},
		{tv(FromInvalidate, e+200, 0, ""), tv(FromFetch, e+700, 0, "B"), tv(FromFetch, e+1300, 0, "C")},
		{tv(FromCallback, e+100, e, "A"), tv(FromSet, e+200, 0, "B"), tv(FromCallback, e+300, e+1, "C")},
		// A deletion (negative entry) and changes from before it arriving
		// late: a callback (by EventTime), a set; then ones from after it,
		// and an import (invalidation) from before it.
		{tv(FromFetch, e, 0, "A"), neg(e + 1000), tv(FromCallback, e+1500, e+500, "B"), tv(FromSet, e+900, 0, "C")},
		{neg(e + 1000), tv(FromCallback, e+1500, e+1000, "B")},
		{neg(e + 1000), tv(FromSet, e+1100, 0, "C")},
		{neg(e + 1000), tv(FromInvalidate, e+500, 0, "")},
		// class entries: within the skew of a set (not stored), past it
		// (stored), then a set of the class (clears it), a fetch sent
		// before the entry (keeps it).
		{tv(FromSet, e+100, 0, "A"), noDataRecord(im.ClassStandard, "none", e+600, fresh)},
		{tv(FromSet, e+100, 0, "A"), noDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(FromSet, e+1300, 0, "B")},
		{noDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(FromFetch, e+1100, 0, "B")},
		{noDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(FromFetch, e+1300, 0, "B")},
		{noDataRecord(im.ClassCustom, "none", e+1200, fresh), tv(FromSet, e+1300, 0, "B")},
		{noDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(FromCallback, e+1300, e+200, "B")},
	}
	for k, seq := range scripted {
		account := fmt.Sprint("scripted", k)
		var mem *Record
		for _, upd := range seq {
			mem = merge(mem, upd, tr.r.skew)
			tr.r.flush([]write{{account, upd}})
		}
		got, err := tr.r.Get(context.Background(), []string{account}, tags)
		if err != nil {
			t.Fatal(err)
		}
		if d := sameRecord(mem, got[0], entries); d != "" {
			t.Fatalf("scripted %d: %s", k, d)
		}
	}
	for trial := range 300 {
		account := fmt.Sprint("acct", trial)
		var mem *Record
		var seq []string
		for i := range 1 + rng.IntN(8) {
			upd := randomWrite(rng, now, i)
			seq = append(seq, fmt.Sprintf("%+v", *upd))
			mem = merge(mem, upd, tr.r.skew)
			tr.r.flush([]write{{account, upd}})
		}
		got, err := tr.r.Get(context.Background(), []string{account}, tags)
		if err != nil {
			t.Fatal(err)
		}
		if d := sameRecord(mem, got[0], entries); d != "" {
			t.Fatalf("trial %d: %s\nwrites:\n%s", trial, d, strings.Join(seq, "\n"))
		}
	}
	if n := testutil.ToFloat64(tr.m.RedisDropped); n != 0 {
		t.Fatalf("%v writes dropped", n)
	}
}

// The write script survives a Redis that lost its scripts (restart,
// failover): the pipeline is sent again with the script's text.
func TestWriteAfterScriptFlush(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	now := time.Now()
	tr.r.flush([]write{{"a", testRecord("a", now)}})
	if _, err := srv.Do("SCRIPT", "FLUSH"); err != nil {
		t.Fatal(err)
	}
	tr.r.flush([]write{{"b", testRecord("b", now)}})
	got, err := tr.r.Get(context.Background(), []string{"a", "b"}, []string{nick})
	if err != nil || got[0] == nil || got[1] == nil {
		t.Fatalf("records after SCRIPT FLUSH: %v, %v", got, err)
	}
	if !tr.r.Up() {
		t.Fatal("tier marked down by NOSCRIPT")
	}
}

// gate is a loader whose calls block until released; each call answers
// with the value current at release.
type gate struct {
	admitAll
	started chan struct{}
	release chan string
}

func (g *gate) Load(ctx context.Context, l Lookup) (Fetched, error) {
	account, tags := l.Account, l.Tags
	sent := time.Now()
	g.started <- struct{}{}
	v := <-g.release
	return Fetched{Tags: tags, Sent: sent, Item: item(account, nick, v)}, nil
}

func newReplica(t *testing.T, l Loader, spec string) (*Cache, *Local, *tier) {
	t.Helper()
	tr := startTier(t, spec, 1400000000)
	local := NewLocal(0)
	c, err := New(Config{Loader: l, Local: local, Remote: tr.r, Metrics: tr.m})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, local, tr
}

func nickOf(t *testing.T, c *Cache, account string) string {
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
	time.Sleep(2 * time.Millisecond)
	if err := c.Change(context.Background(), "u1", []im.ProfileItem{{Tag: nick, Value: raw("new")}}, FromSet, 0, time.Now()); err != nil {
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
	if v, ok := decodeTag(field); !ok || string(v.Value) != `"new"` || v.Origin != FromSet {
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
		if err := c.Change(context.Background(), "u2", []im.ProfileItem{{Tag: nick, Value: raw(e.value)}}, FromCallback, e.event, time.Now()); err != nil {
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
	waitSubscribed(t, trB, 2)
	if err := a.Change(context.Background(), "u3", []im.ProfileItem{{Tag: nick, Value: raw("changed")}}, FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	applied := trB.m.Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied)
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(applied) == 0 { // counted right after it is applied
		if time.Now().After(deadline) {
			t.Fatal("replica b never heard of the change")
		}
		time.Sleep(time.Millisecond)
	}
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
	deadline = time.Now().Add(10 * time.Second)
	for localB.Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("b kept its in-process tier after the feed was cut")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitSubscribed waits until n replicas listen on the feed.
func waitSubscribed(t *testing.T, tr *tier, n int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := tr.client.PubSubNumSub(context.Background(), tr.r.feed).Val()[tr.r.feed]
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d subscribers, want %d", got, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
