package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// go-redis redials a failed pool in a goroutine that notices Close within
// a second (it sleeps between attempts); it is the library's, bounded, and
// not a leak of ours.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"))
}

// loaderFunc adapts a function to Loader, admitting everything.
type loaderFunc func(ctx context.Context, account string, tags []string) (Fetched, error)

func (f loaderFunc) Load(ctx context.Context, l Lookup) (Fetched, error) {
	return f(ctx, l.Account, l.Tags)
}
func (loaderFunc) Admit(int, time.Time, bool) (Ticket, error) { return nil, nil }
func (loaderFunc) Promote(string)                             {}

// admitAll is the admission part of a fake Loader: every request admitted,
// no place held, nothing to promote.
type admitAll struct{}

func (admitAll) Admit(int, time.Time, bool) (Ticket, error) { return nil, nil }
func (admitAll) Promote(string)                             {}

// clock is a settable time source.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }
func newClock() *clock               { return &clock{now: time.Unix(1_700_000_000, 0)} }
func raw(s string) json.RawMessage   { b, _ := json.Marshal(s); return b }
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

func (f *fakeUpstream) Load(ctx context.Context, l Lookup) (Fetched, error) {
	account, tags := l.Account, l.Tags
	f.calls.Add(1)
	if e := f.fail.Load(); e != nil {
		return Fetched{}, *e
	}
	if account == "ghost" {
		return Fetched{Tags: tags, Item: im.UserProfile{ToAccount: account, ResultCode: 40003, ResultInfo: "no such account"}}, nil
	}
	it := im.UserProfile{ToAccount: account}
	for _, t := range tags {
		if t != "Tag_Profile_IM_Location" {
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: raw(fmt.Sprintf("%s:%s:%d", account, t, f.version.Load()))})
		}
	}
	return Fetched{Tags: tags, Item: it}, nil
}

func newCache(t *testing.T, l Loader, clk *clock) (*Cache, *metrics.Metrics) {
	t.Helper()
	m := metrics.New(prometheus.NewRegistry())
	c, err := New(Config{Loader: l, TTL: time.Minute, StaleTTL: time.Hour, NegativeTTL: 30 * time.Second, Metrics: m, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, m
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

func TestHitsAndSubsets(t *testing.T) {
	up := &fakeUpstream{}
	clk := newClock()
	c, m := newCache(t, up, clk)
	ctx := context.Background()
	tags := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Location", "Tag_Profile_IM_Level"}
	a := c.Get(ctx, []string{"u1", "u2"}, tags)
	if up.calls.Load() != 2 {
		t.Fatalf("calls %d", up.calls.Load())
	}
	want := []string{"Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:0", "Tag_Profile_IM_Level=u1:Tag_Profile_IM_Level:0"}
	if got := values(a[0].Item); !slices.Equal(got, want) || a[0].Source != SourceUpstream {
		t.Fatalf("u1 = %v (%s), want %v", got, a[0].Source, want)
	}
	// A subset, in another order, including the unset tag: served from cache.
	b := c.Get(ctx, []string{"u1"}, []string{"Tag_Profile_IM_Level", "Tag_Profile_IM_Location"})
	if up.calls.Load() != 2 || b[0].Source != SourceLocal {
		t.Fatalf("subset went upstream (calls %d, source %s)", up.calls.Load(), b[0].Source)
	}
	if got := values(b[0].Item); !slices.Equal(got, []string{"Tag_Profile_IM_Level=u1:Tag_Profile_IM_Level:0"}) {
		t.Fatalf("subset = %v", got)
	}
	// A tag never fetched is a miss.
	c.Get(ctx, []string{"u1"}, []string{"Tag_Profile_IM_Gender"})
	if up.calls.Load() != 3 {
		t.Fatalf("new tag did not go upstream")
	}
	if hits := testutil.ToFloat64(m.CacheLookups.WithLabelValues("local", "hit")); hits != 1 {
		t.Fatalf("local hits %v", hits)
	}
}

// TestStaleWhileRevalidate: a value past fresh is served as it is while
// one background refresh fetches the new one, which later lookups serve.
// The bubble lets the refresh run to its end before the next lookup.
func TestStaleWhileRevalidate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{}
		clk := newClock()
		c, _ := newCache(t, up, clk)
		ctx := context.Background()
		tags := []string{"Tag_Profile_IM_Nick"}
		c.Get(ctx, []string{"u1"}, tags)
		up.version.Store(1)
		clk.Add(2 * time.Minute) // past fresh, within stale
		a := c.Get(ctx, []string{"u1"}, tags)
		if got := values(a[0].Item); got[0] != "Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:0" {
			t.Fatalf("stale serve = %v", got)
		}
		synctest.Wait() // the background refresh has landed or is stuck
		a = c.Get(ctx, []string{"u1"}, tags)
		if values(a[0].Item)[0] != "Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:1" {
			t.Fatal("background refresh never landed")
		}
		if n := up.calls.Load(); n != 2 {
			t.Fatalf("%d upstream calls, want 2 (one refresh)", n)
		}
	})
}

// TestStaleIfError: with the upstream failing, a value past fresh is still
// served (and counted), one refresh is tried and then backed off, and past
// its stale TTL the error shows.
func TestStaleIfError(t *testing.T) {
	up := &fakeUpstream{}
	clk := newClock()
	c, m := newCache(t, up, clk)
	ctx := context.Background()
	tags := []string{"Tag_Profile_IM_Nick"}
	c.Get(ctx, []string{"u1"}, tags)
	err := error(&upstream.Error{Kind: im.KindHTTP, Status: 502})
	up.fail.Store(&err)
	clk.Add(2 * time.Minute)
	for range 5 {
		a := c.Get(ctx, []string{"u1"}, tags)
		if a[0].Err != nil || values(a[0].Item)[0] != "Tag_Profile_IM_Nick=u1:Tag_Profile_IM_Nick:0" {
			t.Fatalf("stale value not served: %+v", a[0])
		}
		c.bg.Wait()
	}
	if n := up.calls.Load(); n != 2 {
		t.Fatalf("%d upstream calls: refreshes not backed off after a failure", n)
	}
	if s := testutil.ToFloat64(m.CacheLookups.WithLabelValues("local", "stale")); s != 5 {
		t.Fatalf("stale serves counted %v", s)
	}
	clk.Add(6 * time.Second) // the backoff is over: one more try
	c.Get(ctx, []string{"u1"}, tags)
	c.bg.Wait()
	if n := up.calls.Load(); n != 3 {
		t.Fatalf("%d upstream calls after the backoff", n)
	}
	clk.Add(2 * time.Hour) // past stale: nothing servable
	if a := c.Get(ctx, []string{"u1"}, tags); a[0].Err == nil {
		t.Fatalf("past stale TTL, got %+v", a[0])
	}
}

func TestNegativeEntries(t *testing.T) {
	up := &fakeUpstream{}
	clk := newClock()
	c, _ := newCache(t, up, clk)
	ctx := context.Background()
	for range 3 {
		a := c.Get(ctx, []string{"ghost"}, []string{"Tag_Profile_IM_Nick"})
		if a[0].Item.ResultCode != 40003 || a[0].Err != nil {
			t.Fatalf("ghost = %+v", a[0])
		}
	}
	if n := up.calls.Load(); n != 1 {
		t.Fatalf("negative entry not cached: %d calls", n)
	}
	clk.Add(31 * time.Second)
	c.Get(ctx, []string{"ghost"}, []string{"Tag_Profile_IM_Nick"})
	if n := up.calls.Load(); n != 2 {
		t.Fatalf("negative entry outlived its TTL: %d calls", n)
	}
}

func TestTransientNotCached(t *testing.T) {
	var calls atomic.Int32
	l := loaderFunc(func(ctx context.Context, a string, tags []string) (Fetched, error) {
		calls.Add(1)
		return Fetched{Tags: tags, Item: im.UserProfile{ToAccount: a, ResultCode: 40006}}, nil
	})
	c, _ := newCache(t, l, newClock())
	for range 2 {
		a := c.Get(context.Background(), []string{"u1"}, []string{"Tag_Profile_IM_Nick"})
		if a[0].Item.ResultCode != 40006 {
			t.Fatalf("%+v", a[0])
		}
	}
	if calls.Load() != 2 {
		t.Fatalf("transient failure was cached")
	}
}

// TestSingleflight: concurrent misses of one account and tag set make one
// load; when every caller leaves, the load's context ends.
func TestSingleflight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var calls atomic.Int32
		ended := make(chan error, 1)
		l := loaderFunc(func(ctx context.Context, a string, tags []string) (Fetched, error) {
			calls.Add(1)
			select {
			case <-release:
				return Fetched{Tags: tags, Item: item(a, "Tag_Profile_IM_Nick", "n-"+a)}, nil
			case <-ctx.Done():
				ended <- ctx.Err()
				return Fetched{}, ctx.Err()
			}
		})
		c, m := newCache(t, l, newClock())
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				a := c.Get(context.Background(), []string{"u1"}, []string{"Tag_Profile_IM_Nick"})
				if got := values(a[0].Item); len(got) != 1 || got[0] != "Tag_Profile_IM_Nick=n-u1" {
					t.Errorf("got %v %v", got, a[0].Err)
				}
			})
		}
		synctest.Wait() // every caller is in: one loading, the others waiting on it
		if n := testutil.ToFloat64(m.SingleflightShared); n < 19 {
			t.Fatalf("%v of 20 concurrent callers shared the load, want 19", n)
		}
		close(release)
		wg.Wait()
		if calls.Load() != 1 {
			t.Fatalf("%d loads for 20 concurrent misses", calls.Load())
		}

		// Every caller leaves: the flight's context is cancelled.
		release = make(chan struct{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan []Answer)
		go func() { done <- c.Get(ctx, []string{"u2"}, []string{"Tag_Profile_IM_Nick"}) }()
		synctest.Wait() // the caller's load has started
		if n := calls.Load(); n != 2 {
			t.Fatalf("%d loads, want the new caller's second", n)
		}
		cancel()
		if a := <-done; !errors.Is(a[0].Err, context.Canceled) {
			t.Fatalf("leaver got %+v", a[0])
		}
		select {
		case err := <-ended:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("flight ended with %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("flight context not cancelled after its last caller left")
		}
	})
}

func TestLocalBounded(t *testing.T) {
	l := NewLocal(640)
	now := time.Now()
	for i := range 10_000 {
		l.Merge(fmt.Sprint("u", i), &Record{}, now)
	}
	if n := l.Len(); n > 640 {
		t.Fatalf("local tier holds %d records, bound 640", n)
	}
}

// TestLocalMemoryPerAccount bounds what the in-process tier costs: the
// default of a million accounts must fit a pod's memory.
func TestLocalMemoryPerAccount(t *testing.T) {
	l := NewLocal(0)
	now := time.Now()
	var m0, m1 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	const n = 50_000
	for i := range n {
		a := "user" + strconv.Itoa(i)
		l.Merge(a, &Record{Tags: []TagValue{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"nick-` + a + `"`), Set: true, Fresh: now, Stale: now}}}, now)
	}
	runtime.GC()
	runtime.ReadMemStats(&m1)
	per := (int64(m1.HeapAlloc) - int64(m0.HeapAlloc)) / n
	runtime.KeepAlive(l)
	t.Logf("%d bytes of heap per cached account (one tag)", per)
	if per > 400 {
		t.Fatalf("%d bytes per account: a million accounts would not fit", per)
	}
}
