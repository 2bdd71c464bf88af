package cache

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// hitsLoader answers every kind of cached outcome: "ghost" does not exist
// (40003), "nostd" holds no standard data (40807), "nocustom" no custom
// data (40809), Tag_Profile_IM_Location is never set, and every other tag
// is "<account>:<tag>:<version>".
type hitsLoader struct {
	admitAll
	calls   atomic.Int32
	version atomic.Int32
}

func (l *hitsLoader) Load(_ context.Context, lk Lookup) (Fetched, error) {
	l.calls.Add(1)
	it := im.UserProfile{ToAccount: lk.Account}
	cls := im.ClassesOf(lk.Tags)
	switch {
	case lk.Account == "ghost":
		it.ResultCode, it.ResultInfo = 40003, "no such account"
	case lk.Account == "nostd" && cls&im.ClassStandard != 0:
		it.ResultCode, it.ResultInfo = 40807, "no standard data"
	case lk.Account == "nocustom" && cls&im.ClassCustom != 0:
		it.ResultCode, it.ResultInfo = 40809, "no custom data"
	default:
		for _, t := range lk.Tags {
			if t != "Tag_Profile_IM_Location" {
				it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: raw(fmt.Sprintf("%s:%s:%d", lk.Account, t, l.version.Load()))})
			}
		}
	}
	return Fetched{Tags: lk.Tags, Item: it}, nil
}

// twin is one of two caches driven through the same steps: one answers
// with Hits (then Get when Hits declines), the other with Get alone.
type twin struct {
	c   *Cache
	up  *hitsLoader
	clk *clock
	reg *prometheus.Registry
}

func newTwin(t *testing.T) *twin {
	t.Helper()
	tw := &twin{up: &hitsLoader{}, clk: newClock(), reg: prometheus.NewRegistry()}
	c, err := New(Config{Loader: tw.up, TTL: time.Minute, StaleTTL: time.Hour, NegativeTTL: 30 * time.Second,
		Metrics: metrics.New(tw.reg), Now: tw.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	tw.c = c
	return tw
}

// counters returns every counter of tw's registry by name and labels.
func (tw *twin) counters(t *testing.T) map[string]float64 {
	t.Helper()
	fams, err := tw.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			if m.GetCounter() == nil {
				continue
			}
			k := f.GetName()
			for _, lp := range m.GetLabel() {
				k += "," + lp.GetName() + "=" + lp.GetValue()
			}
			out[k] = m.GetCounter().GetValue()
		}
	}
	return out
}

// hitTags is the proxy's longest tag list: every standard tag, then custom
// tags up to im.MaxTagsPerCall.
func hitTags() []string {
	tags := append([]string(nil), im.StandardTags...)
	for i := 0; len(tags) < im.MaxTagsPerCall; i++ {
		tags = append(tags, "Tag_Profile_Custom_"+strings.Repeat(string(rune('a'+i%26)), 1+i/26))
	}
	return tags
}

func manyAccounts(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "user" + strconv.Itoa(i)
	}
	return out
}

type hitsStep struct {
	accounts, tags []string
}

type hitsCase struct {
	name   string
	warm   []hitsStep // Get on both caches
	after  time.Duration
	then   []hitsStep // Get on both caches after the wait, refreshes landed
	ask    hitsStep
	wantOK bool
}

func hitsCases() []hitsCase {
	nick, gender, loc := "Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Location"
	custom := "Tag_Profile_Custom_abc"
	three := []string{nick, gender, loc}
	all, hundred := hitTags(), manyAccounts(100)
	w := func(accounts []string, tags ...string) []hitsStep { return []hitsStep{{accounts, tags}} }
	a := func(accounts []string, tags ...string) hitsStep { return hitsStep{accounts, tags} }
	u1, u2 := []string{"u1"}, []string{"u2"}
	return []hitsCase{
		{"fresh one tag", w(u1, nick), 0, nil, a(u1, nick), true},
		{"fresh several tags", w(u1, three...), 0, nil, a(u1, three...), true},
		{"fresh tags reordered and repeated", w(u1, three...), 0, nil, a(u1, loc, nick, nick, gender, loc), true},
		{"fresh subset", w(u1, three...), 0, nil, a(u1, gender, nick), true},
		{"fresh only unset tag", w(u1, three...), 0, nil, a(u1, loc), true},
		{"not found", w([]string{"ghost"}, nick), 0, nil, a([]string{"ghost"}, gender, custom), true},
		{"no standard data", w([]string{"nostd"}, nick), 0, nil, a([]string{"nostd"}, nick), true},
		{"no custom data", w([]string{"nocustom"}, custom), 0, nil, a([]string{"nocustom"}, custom, custom), true},
		{"no standard data, custom asked too", []hitsStep{{[]string{"nostd"}, []string{nick}}, {[]string{"nostd"}, []string{custom}}}, 0, nil,
			a([]string{"nostd"}, custom, nick), true},
		{"stale", w(u1, three...), 2 * time.Minute, nil, a(u1, nick, loc), true},
		{"stale and fresh mixed", []hitsStep{{[]string{"u1", "u2"}, three}}, 2 * time.Minute, w(u2, nick), a([]string{"u1", "u2"}, nick), true},
		{"expired", w(u1, nick), 2 * time.Hour, nil, a(u1, nick), false},
		{"not found expired", w([]string{"ghost"}, nick), time.Minute, nil, a([]string{"ghost"}, nick), false},
		{"missing account", w(u1, nick), 0, nil, a(u2, nick), false},
		{"missing tag", w(u1, nick), 0, nil, a(u1, nick, gender), false},
		{"mixed hits", []hitsStep{{[]string{"u1", "ghost", "nostd", "u2"}, three}}, 0, nil,
			a([]string{"u2", "ghost", "u1", "nostd", "u1"}, gender, nick), true},
		{"mixed with a miss last", w([]string{"u1", "ghost", "u2"}, nick), 0, nil, a([]string{"u1", "ghost", "u2", "u3"}, nick), false},
		{"mixed with a miss first", w([]string{"u1", "ghost"}, nick), 0, nil, a([]string{"u3", "u1", "ghost"}, nick), false},
		{"stale then a miss", w(u1, nick), 2 * time.Minute, nil, a([]string{"u1", "u3"}, nick), false},
		{"100 accounts, 64 tags", w(hundred, all...), 0, nil, a(hundred, all...), true},
		{"100 accounts, 64 tags stale", w(hundred, all...), 90 * time.Second, nil, a(hundred, all...), true},
		{"100 accounts, one missing", w(hundred[:99], all...), 0, nil, a(hundred, all...), false},
		{"invalid accounts", w(u1, nick), 0, nil, a([]string{"", "a\x00b", strings.Repeat("x", 10_000), "\xff"}, nick), false},
		{"no accounts", nil, 0, nil, a(nil, nick), true},
	}
}

// TestHitsMatchesGet drives two caches through the same steps, one asking
// Hits (then Get when it declines), the other Get alone: the answers are
// the same, byte for byte, and so are the counters and upstream calls.
func TestHitsMatchesGet(t *testing.T) {
	ctx := context.Background()
	for _, tc := range hitsCases() {
		t.Run(tc.name, func(t *testing.T) {
			h, g := newTwin(t), newTwin(t)
			for _, tw := range []*twin{h, g} {
				for _, s := range tc.warm {
					tw.c.Get(ctx, s.accounts, s.tags)
				}
				tw.up.version.Store(1)
				tw.clk.Add(tc.after)
			}
			for _, tw := range []*twin{h, g} {
				for _, s := range tc.then {
					tw.c.Get(ctx, s.accounts, s.tags)
				}
				tw.c.bg.Wait()
			}
			prefix := []Answer{{Item: im.UserProfile{ToAccount: "earlier"}, Source: SourceRemote}}
			dst := append(make([]Answer, 0, 1), prefix...) // too small: Hits grows it
			got, items, ok := h.c.Hits(dst, nil, tc.ask.accounts, tc.ask.tags)
			if ok != tc.wantOK {
				t.Fatalf("ok = %v, want %v", ok, tc.wantOK)
			}
			if !reflect.DeepEqual(got[:1], prefix) {
				t.Fatalf("dst's answers changed: %+v", got[:1])
			}
			got = got[1:]
			if !ok {
				if len(got) != 0 || len(items) != 0 {
					t.Fatalf("declined with %d answers, %d items", len(got), len(items))
				}
				if c := h.counters(t); !reflect.DeepEqual(c, g.counters(t)) {
					t.Fatalf("declining Hits counted: %v", c)
				}
				got = h.c.Get(ctx, tc.ask.accounts, tc.ask.tags)
			}
			want := g.c.Get(ctx, tc.ask.accounts, tc.ask.tags)
			sameAnswers(t, got, want)
			h.c.bg.Wait()
			g.c.bg.Wait()
			if hc, gc := h.counters(t), g.counters(t); !reflect.DeepEqual(hc, gc) {
				t.Fatalf("counters differ:\nHits+Get %v\nGet      %v", hc, gc)
			}
			if hn, gn := h.up.calls.Load(), g.up.calls.Load(); hn != gn {
				t.Fatalf("%d upstream calls with Hits, %d with Get alone", hn, gn)
			}
		})
	}
}

func sameAnswers(t *testing.T, got, want []Answer) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("answers differ:\ngot  %+v\nwant %+v", got, want)
	}
	for i := range got {
		gb, err1 := json.Marshal(got[i].Item)
		wb, err2 := json.Marshal(want[i].Item)
		if err1 != nil || err2 != nil || string(gb) != string(wb) {
			t.Fatalf("answer %d encodes as %s, want %s (%v %v)", i, gb, wb, err1, err2)
		}
	}
}

// TestHitsServesStaleAndRefreshes: a stale answer comes back as Get's
// (SourceLocal, the old value), counted stale, and its one refresh lands.
func TestHitsServesStaleAndRefreshes(t *testing.T) {
	tw := newTwin(t)
	tags := []string{"Tag_Profile_IM_Nick"}
	tw.c.Get(context.Background(), []string{"u1", "u2"}, tags)
	tw.up.version.Store(1)
	tw.clk.Add(2 * time.Minute)
	ans, _, ok := tw.c.Hits(nil, nil, []string{"u1", "u2"}, tags)
	if !ok || ans[0].Source != SourceLocal || values(ans[0].Item)[0] != "Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:0" {
		t.Fatalf("stale serve: %v %+v", ok, ans)
	}
	tw.c.bg.Wait()
	if n := tw.up.calls.Load(); n != 4 { // two warm loads, one refresh per account
		t.Fatalf("%d upstream calls, want 4", n)
	}
	c := tw.counters(t)
	if c["portrait_proxy_cache_lookups_total,result=stale,tier=local"] != 2 {
		t.Fatalf("stale serves counted: %v", c)
	}
	ans, _, ok = tw.c.Hits(nil, nil, []string{"u1"}, tags)
	if !ok || values(ans[0].Item)[0] != "Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:1" {
		t.Fatalf("refresh did not land: %v %+v", ok, ans)
	}
}

// TestHitsBufferLifetime: answers live in the caller's buffers and stay
// intact until those buffers are passed again; answers appended after
// earlier ones leave those alone; one answer's items cannot be grown over
// the next one's.
func TestHitsBufferLifetime(t *testing.T) {
	tw := newTwin(t)
	ctx := context.Background()
	three := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Level"}
	tw.c.Get(ctx, manyAccounts(20), three)

	// Call N into buffers A; call N+1 into buffers B: N's answers intact.
	bufA, itemsA, ok := tw.c.Hits(make([]Answer, 0, 64), make([]im.ProfileItem, 0, 256), manyAccounts(10), three)
	want := deepCopy(bufA)
	if !ok || len(itemsA) != 30 {
		t.Fatalf("ok %v, %d items", ok, len(itemsA))
	}
	var bufB []Answer
	var itemsB []im.ProfileItem
	for range 3 {
		bufB, itemsB, _ = tw.c.Hits(bufB[:0], itemsB[:0], manyAccounts(20)[10:], three[:1])
	}
	sameAnswers(t, bufA, want)

	// Appending after call N's answers (passing them, not emptied) keeps
	// them, even when the buffers must grow.
	all, allItems, ok := tw.c.Hits(bufA, itemsA, manyAccounts(20), three)
	if !ok || len(all) != 30 || len(allItems) != 90 {
		t.Fatalf("ok %v, %d answers, %d items", ok, len(all), len(allItems))
	}
	sameAnswers(t, all[:10], want)
	sameAnswers(t, bufA, want)

	// An answer's items are capped: appending to one leaves the next alone.
	first := append(all[0].Item.ProfileItem, im.ProfileItem{Tag: "x"})
	sameAnswers(t, all[1:10], want[1:])
	if len(first) != 4 {
		t.Fatal("append did not happen")
	}

	// Reused (emptied) buffers: the new answers are right, without growth.
	ptr := &bufA[:1][0]
	again, _, ok := tw.c.Hits(bufA[:0], itemsA[:0], manyAccounts(10), three)
	if !ok || &again[0] != ptr {
		t.Fatal("emptied buffers not reused")
	}
	sameAnswers(t, again, want)
}

func deepCopy(answers []Answer) []Answer {
	out := make([]Answer, len(answers))
	for i, a := range answers {
		out[i] = a
		out[i].Item.ProfileItem = make([]im.ProfileItem, len(a.Item.ProfileItem))
		for k, p := range a.Item.ProfileItem {
			out[i].Item.ProfileItem[k] = im.ProfileItem{Tag: strings.Clone(p.Tag), Value: append(json.RawMessage{}, p.Value...)}
		}
	}
	return out
}

// TestHitsAllocs: with buffers large enough, Hits allocates nothing, for
// hits of every kind but "no data" and for declining.
func TestHitsAllocs(t *testing.T) {
	tw := newTwin(t)
	ctx := context.Background()
	all, hundred := hitTags(), manyAccounts(100)
	tw.c.Get(ctx, hundred, all)
	tw.c.Get(ctx, []string{"ghost"}, all[:1])
	cases := []hitsStep{
		{[]string{"user1"}, all[:1]},
		{hundred, all},
		{[]string{"ghost", "user3", "ghost"}, all[:5]},
		{[]string{"user1", "nobody"}, all[:1]}, // declined
	}
	for _, s := range cases {
		dst, items, _ := tw.c.Hits(nil, nil, s.accounts, s.tags)
		if n := testing.AllocsPerRun(20, func() {
			dst, items, _ = tw.c.Hits(dst[:0], items[:0], s.accounts, s.tags)
		}); n != 0 {
			t.Errorf("%d accounts, %d tags: %v allocations per call", len(s.accounts), len(s.tags), n)
		}
	}
}

// TestHitsConcurrent: callers with their own buffers, while the accounts'
// records are replaced, always get whole answers of one version each.
func TestHitsConcurrent(t *testing.T) {
	tw := newTwin(t)
	ctx := context.Background()
	tags := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender"}
	accounts := manyAccounts(8)
	tw.c.Get(ctx, accounts, tags)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			var dst []Answer
			var items []im.ProfileItem
			for {
				select {
				case <-stop:
					return
				default:
				}
				var ok bool
				dst, items, ok = tw.c.Hits(dst[:0], items[:0], accounts, tags)
				if !ok {
					t.Error("declined a cached lookup")
					return
				}
				for i, a := range dst {
					checkOneVersion(t, accounts[i], a)
				}
			}
		})
	}
	for v := range 200 {
		items := []im.ProfileItem{{Tag: tags[0], Value: raw(fmt.Sprintf("%s:%d", tags[0], v))}, {Tag: tags[1], Value: raw(fmt.Sprintf("%s:%d", tags[1], v))}}
		tw.c.Change(ctx, accounts[v%len(accounts)], items, FromSet, 0, tw.clk.Now().Add(time.Duration(v)*time.Millisecond))
	}
	close(stop)
	wg.Wait()
}

// checkOneVersion fails unless a holds both asked tags, in order, of one
// write (a fetch's "<account>:<tag>:0" or a change's "<tag>:<v>").
func checkOneVersion(t *testing.T, account string, a Answer) {
	t.Helper()
	v := values(a.Item)
	if a.Item.ToAccount != account || len(v) != 2 || !strings.HasPrefix(v[0], "Tag_Profile_IM_Nick=") || !strings.HasPrefix(v[1], "Tag_Profile_IM_Gender=") {
		t.Errorf("%s: %+v", account, a)
		return
	}
	sfx := func(s string) string { return s[strings.LastIndexByte(s, ':'):] }
	if sfx(v[0]) != sfx(v[1]) {
		t.Errorf("%s: values of two versions: %v", account, v)
	}
}
