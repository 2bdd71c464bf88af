package cache

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
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
