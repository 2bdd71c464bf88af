package cache

import (
	"context"
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
)

// classLoader plays the upstream's "no data" answers: "nostd" holds no
// standard data (40807 when a standard tag is asked), "nocustom" no custom
// data (40809), "ghost" does not exist (40003); other tags are "<tag>".
type classLoader struct {
	admitAll
	calls atomic.Int32
}

func (l *classLoader) Load(_ context.Context, lk Lookup) (Fetched, error) {
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
	return Fetched{Tags: tags, Item: it, Sent: time.Now()}, nil
}

type lookupCase struct {
	account string
	tags    []string
	code    int // 0: the tags' values
	calls   int32
}

func checkLookups(t *testing.T, c *Cache, l *classLoader, cases []lookupCase) {
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

// TestNoDataPerClass: 40807/40809 are cached for their tag class only:
// they never answer tags of the other class, never replace values cached
// for it, and only 40003 is account-wide.
func TestNoDataPerClass(t *testing.T) {
	clk := newClock()
	l := &classLoader{}
	c, _ := newCache(t, l, clk)
	checkLookups(t, c, l, []lookupCase{
		{"nostd", []string{customTag}, 0, 1},
		{"nostd", []string{nick}, 40807, 1},
		{"nostd", []string{nick}, 40807, 0},            // cached for standard tags
		{"nostd", []string{customTag}, 0, 0},           // the customTag value still served
		{"nostd", []string{nick, customTag}, 40807, 0}, // as the upstream answers it
		{"nocustom", []string{nick}, 0, 1},
		{"nocustom", []string{customTag}, 40809, 1},
		{"nocustom", []string{nick}, 0, 0}, // standard tags still served
		{"nocustom", []string{customTag}, 40809, 0},
		{"ghost", []string{nick}, 40003, 1},
		{"ghost", []string{customTag}, 40003, 0}, // account-wide
	})
	clk.Add(31 * time.Second) // past NegativeTTL: asked again
	checkLookups(t, c, l, []lookupCase{
		{"nostd", []string{nick}, 40807, 1},
		{"nocustom", []string{customTag}, 40809, 1},
	})
}

// TestNoDataMarkerOrdering: a marker answers its class only while no value
// of that class is newer; a newer marker wins over an older value.
func TestNoDataMarkerOrdering(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	until := now.Add(time.Minute)
	val := TagValue{Tag: nick, Value: raw("n"), Set: true, Ver: 200, Fresh: until, Stale: until.Add(time.Hour)}
	for _, tc := range []struct {
		markerVer int64
		code      int
	}{{100, 0}, {300, 40807}} {
		rec := merge(&Record{Tags: []TagValue{val}}, noDataRecord(im.ClassStandard, "none", tc.markerVer, until), int64(time.Second/time.Millisecond))
		it := pick("a", rec, []string{nick}, now)
		if it.ResultCode != tc.code {
			t.Fatalf("marker ver %d over value ver 200: %+v", tc.markerVer, it)
		}
		if it := pick("a", rec, []string{customTag}, now); it.ResultCode != 0 {
			t.Fatalf("standard marker answered a customTag tag: %+v", it)
		}
	}
}

// TestRedisNoDataPerClass: through a real Redis (the write script orders
// markers like any field), a replica that never called the upstream serves
// what another learned: 40809 for customTag tags, the standard value for
// standard ones; and neither becomes account-wide.
func TestRedisNoDataPerClass(t *testing.T) {
	srv := redistest.Start(t)
	trA, trB := startTier(t, srv.URL(), 1), startTier(t, srv.URL(), 1)
	la, lb := &classLoader{}, &classLoader{}
	ca, err := New(Config{Loader: la, Remote: trA.r, Metrics: trA.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ca.Close)
	cb, err := New(Config{Loader: lb, Remote: trB.r, Metrics: trB.m, NegativeTTL: time.Minute})
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
	deadline := time.Now().Add(5 * time.Second)
	for {
		recs, _ := trB.r.Get(context.Background(), []string{"nocustom", "nostd"}, []string{nick, customTag})
		if recs[0].state([]string{customTag}, time.Now()) == stateNotFound && recs[1].state([]string{nick}, time.Now()) == stateNotFound &&
			recs[0].state([]string{nick}, time.Now()) == stateFresh && recs[1].state([]string{customTag}, time.Now()) == stateFresh {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B never saw A's entries: %+v %+v", recs[0], recs[1])
		}
		time.Sleep(2 * time.Millisecond)
	}
	checkLookups(t, cb, lb, []lookupCase{
		{"nocustom", []string{nick}, 0, 0},
		{"nocustom", []string{customTag}, 40809, 0},
		{"nostd", []string{customTag}, 0, 0},
		{"nostd", []string{nick}, 40807, 0},
	})
	// The script keeps the newer of a marker and a value of its class.
	ctx := context.Background()
	now := time.Now()
	v := TagValue{Tag: nick, Value: json.RawMessage(`"n"`), Set: true, Ver: now.UnixMilli() + 10_000, Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}
	trA.r.Put(ctx, []string{"nostd"}, []*Record{{Tags: []TagValue{v}}})
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		recs, _ := trB.r.Get(ctx, []string{"nostd"}, []string{nick})
		if it := pick("nostd", recs[0], []string{nick}, time.Now()); it.ResultCode == 0 && len(it.ProfileItem) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a value newer than the marker is not served")
		}
	}
}

// flipLoader answers 40807 for standard tags until hasStd is set, then
// the tags unset (the account now holds standard data).
type flipLoader struct {
	admitAll
	calls  atomic.Int32
	hasStd atomic.Bool
}

func (l *flipLoader) Load(_ context.Context, lk Lookup) (Fetched, error) {
	account, tags := lk.Account, lk.Tags
	l.calls.Add(1)
	it := im.UserProfile{ToAccount: account}
	if !l.hasStd.Load() && im.ClassesOf(tags)&im.ClassStandard != 0 {
		it.ResultCode, it.ResultInfo = 40807, "no standard data"
	}
	return Fetched{Tags: tags, Item: it, Sent: time.Now()}, nil
}

// TestNoDataEntryClearedBySetOfItsClass: a portrait_set of a standard tag
// (through a real Redis) ends the account's "no standard data" entry, so
// another standard tag is fetched, not answered 40807.
func TestNoDataEntryClearedBySetOfItsClass(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1)
	l := &flipLoader{}
	c, err := New(Config{Loader: l, Remote: tr.r, Metrics: tr.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()
	if a := c.Get(ctx, []string{"acct"}, []string{nick})[0]; a.Item.ResultCode != 40807 {
		t.Fatalf("first lookup: %+v", a)
	}
	waitWritten(t, tr, "acct")
	time.Sleep(5 * time.Millisecond)
	l.hasStd.Store(true)
	if err := c.Change(ctx, "acct", []im.ProfileItem{{Tag: nick, Value: raw("n")}}, FromSet, 0, time.Now()); err != nil {
		t.Fatal(err)
	}
	if a := c.Get(ctx, []string{"acct"}, []string{nick})[0]; a.Item.ResultCode != 0 {
		t.Fatalf("the set nickname: %+v", a.Item)
	}
	// Another replica, which only reads Redis, and then this one.
	tr2 := startTier(t, srv.URL(), 1)
	c2, err := New(Config{Loader: l, Remote: tr2.r, Metrics: tr2.m, NegativeTTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c2.Close)
	for i, c := range []*Cache{c2, c} {
		a := c.Get(ctx, []string{"acct"}, []string{"Tag_Profile_IM_Gender"})[0]
		if a.Item.ResultCode != 0 {
			t.Fatalf("replica %d: after a portrait_set of a standard tag, another standard tag answered %d %q (source %s)",
				i, a.Item.ResultCode, a.Item.ResultInfo, a.Source)
		}
	}
}

// TestNoDataEntryWithinSkewOfSetNotStored: a fetch sent within the clock
// skew after a portrait_set, answered 40807, does not hide the set value.
func TestNoDataEntryWithinSkewOfSetNotStored(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	until := now.Add(time.Minute)
	set := TagValue{Tag: nick, Value: raw("n"), Set: true, Origin: FromSet, Ver: 1_000_000, Fresh: until, Stale: until.Add(time.Hour)}
	skew := int64(time.Second / time.Millisecond)
	fetch := TagValue{Tag: nick, Origin: FromFetch, Ver: 1_000_500}
	if supersedes(&fetch, &set, skew) {
		t.Fatal("premise")
	}
	rec := merge(&Record{Tags: []TagValue{set}}, noDataRecord(im.ClassStandard, "none", 1_000_500, until), skew)
	if it := pick("a", rec, []string{nick}, now); it.ResultCode != 0 {
		t.Fatalf("set Nick hidden by the class entry: %+v", it)
	}
	// Past the skew the entry is stored and answers.
	rec = merge(&Record{Tags: []TagValue{set}}, noDataRecord(im.ClassStandard, "none", 1_001_000, until), skew)
	if it := pick("a", rec, []string{nick}, now); it.ResultCode != 40807 {
		t.Fatalf("an entry sent past the skew: %+v", it)
	}
}
