package batcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeUpstream answers with a function and records every call.
type fakeUpstream struct {
	mu    sync.Mutex
	calls []im.GetRequest
	fn    func(n int, req im.GetRequest) (*im.GetResponse, error)
}

func (f *fakeUpstream) PortraitGet(ctx context.Context, req im.GetRequest) (*im.GetResponse, error) {
	f.mu.Lock()
	f.calls = append(f.calls, req)
	n := len(f.calls)
	f.mu.Unlock()
	return f.fn(n, req)
}

func (f *fakeUpstream) Calls() []im.GetRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// found answers every account with "v-<account>-<tag>" for every tag.
func found(req im.GetRequest) *im.GetResponse {
	resp := &im.GetResponse{ActionStatus: "OK"}
	for _, a := range req.ToAccount {
		item := im.UserProfile{ToAccount: a}
		for _, t := range req.TagList {
			v, _ := json.Marshal("v-" + a + "-" + t)
			item.ProfileItem = append(item.ProfileItem, im.ProfileItem{Tag: t, Value: v})
		}
		resp.UserProfileItem = append(resp.UserProfileItem, item)
	}
	return resp
}

// gate is a limiter that grants one call per token sent on ch.
type gate struct {
	ch          chan struct{}
	backoffs    atomic.Int32
	mu          sync.Mutex
	pauses      []time.Duration
	pausedUntil time.Time
}

func newGate() *gate { return &gate{ch: make(chan struct{})} }

func (g *gate) Acquire(ctx context.Context) (*limiter.Permit, error) {
	select {
	case <-g.ch:
		return limiter.NewPermit(func(bool) {}), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *gate) Throttled(d time.Duration) {
	g.backoffs.Add(1)
	g.mu.Lock()
	g.pauses = append(g.pauses, d)
	g.pausedUntil = time.Now().Add(d)
	g.mu.Unlock()
}

// Paused is what is left of the last pause (the gate grants on its channel
// regardless).
func (g *gate) Paused() time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return max(0, time.Until(g.pausedUntil))
}

// open is a limiter that always grants.
type open struct{}

func (open) Acquire(ctx context.Context) (*limiter.Permit, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return limiter.NewPermit(func(bool) {}), nil
}

type harness struct {
	b    *Batcher
	up   *fakeUpstream
	m    *metrics.Metrics
	stop func()
}

func start(t *testing.T, cfg Config) *harness {
	t.Helper()
	m := metrics.New(prometheus.NewRegistry())
	cfg.Metrics = m
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.Run(ctx); close(done) }()
	h := &harness{b: b, up: cfg.Upstream.(*fakeUpstream), m: m}
	var once sync.Once
	h.stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(h.stop)
	return h
}

// The tests that run a Batcher run in a synctest bubble: the Batcher, its
// callers and the fakes use the standard clock and channels only, so
// synctest.Wait returns once every Load has queued and Run is blocked (on
// the gate, a window's timer or an empty queue), and the windows and
// timeouts pass at once on the bubble's clock.

// waitQueued waits until every other goroutine in the bubble is blocked and
// checks that n accounts are queued then.
func (h *harness) waitQueued(t *testing.T, n int) {
	t.Helper()
	synctest.Wait()
	if got := testutil.ToFloat64(h.m.QueueAccounts); got != float64(n) {
		t.Fatalf("queue holds %v accounts, want %d", got, n)
	}
}

// waitWaiters waits until every other goroutine in the bubble is blocked and
// checks that account's pending entry has n waiters then (a Load that joins
// an account already queued changes no gauge).
func (h *harness) waitWaiters(t *testing.T, account string, n int) {
	t.Helper()
	synctest.Wait()
	h.b.mu.Lock()
	got := 0
	if e := h.b.pending[account]; e != nil {
		got = len(e.waiters)
	}
	h.b.mu.Unlock()
	if got != n {
		t.Fatalf("%s has %d waiters, want %d", account, got, n)
	}
}

type loaded struct {
	res Result
	err error
}

func loadAsync(b *Batcher, ctx context.Context, account string, tags ...string) chan loaded {
	return loadAsyncWith(b, ctx, LoadOptions{}, account, tags...)
}

func loadAsyncWith(b *Batcher, ctx context.Context, opt LoadOptions, account string, tags ...string) chan loaded {
	ch := make(chan loaded, 1)
	go func() {
		r, err := b.LoadWith(ctx, account, tags, opt)
		ch <- loaded{r, err}
	}()
	return ch
}

func value(r Result, tag string) string {
	for _, p := range r.Item.ProfileItem {
		if p.Tag == tag {
			var s string
			json.Unmarshal(p.Value, &s)
			return s
		}
	}
	return ""
}

// TestFillsWhileWaitingForToken queues 250 accounts while no token is free
// and checks that they leave as 100 + 100 + 50, each caller answered with
// its own account.
func TestFillsWhileWaitingForToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }}, Limiter: g})
		var chans []chan loaded
		for i := range 250 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 250)
		for range 3 {
			g.ch <- struct{}{}
		}
		for i, ch := range chans {
			l := <-ch
			want := fmt.Sprintf("v-u%d-Tag_Profile_IM_Nick", i)
			if l.err != nil || l.res.Item.ToAccount != fmt.Sprintf("u%d", i) || value(l.res, "Tag_Profile_IM_Nick") != want {
				t.Fatalf("caller %d got %+v, %v", i, l.res.Item, l.err)
			}
		}
		var sizes []int
		for _, c := range h.up.Calls() {
			sizes = append(sizes, len(c.ToAccount))
		}
		slices.Sort(sizes)
		if !slices.Equal(sizes, []int{50, 100, 100}) {
			t.Fatalf("call sizes %v, want [100 100 50]", sizes)
		}
	})
}

// TestTagUnion checks that one account asked for different tags takes one
// slot, and the call fetches the union plus the default tags.
func TestTagUnion(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: g, DefaultTags: []string{"Tag_Profile_IM_Level"}})
		a := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		b := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Nick")
		c := loadAsync(h.b, context.Background(), "u2", "Tag_Profile_Custom_Test")
		h.waitQueued(t, 2)
		h.waitWaiters(t, "u1", 2)
		g.ch <- struct{}{}
		for _, ch := range []chan loaded{a, b, c} {
			if l := <-ch; l.err != nil {
				t.Fatal(l.err)
			}
		}
		calls := h.up.Calls()
		if len(calls) != 1 || !slices.Equal(slices.Sorted(slices.Values(calls[0].ToAccount)), []string{"u1", "u2"}) {
			t.Fatalf("calls %+v", calls)
		}
		want := []string{"Tag_Profile_Custom_Test", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Level", "Tag_Profile_IM_Nick"}
		got := slices.Sorted(slices.Values(calls[0].TagList))
		if calls[0].TagList[0] != "Tag_Profile_IM_Level" || !slices.Equal(got, want) {
			t.Fatalf("TagList %v, want %v", calls[0].TagList, want)
		}
	})
}

func TestWholeCallNotFoundIsolated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			if slices.Contains(r.ToAccount, "bad") {
				return &im.GetResponse{ActionStatus: "FAIL", ErrorCode: 40003},
					&upstream.Error{Kind: im.KindNotFound, Code: 40003, Info: "account does not exist"}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 100 {
			a := fmt.Sprintf("u%d", i)
			if i == 37 {
				a = "bad"
			}
			chans = append(chans, loadAsync(h.b, context.Background(), a, "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 100)
		feed, fed := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(fed)
			for {
				select {
				case g.ch <- struct{}{}:
				case <-feed:
					return
				}
			}
		}()
		defer func() { close(feed); <-fed }()
		for i, ch := range chans {
			l := <-ch
			if l.err != nil {
				t.Fatalf("caller %d: %v", i, l.err)
			}
			if i == 37 {
				if l.res.Item.ResultCode != 40003 || l.res.Item.ToAccount != "bad" {
					t.Fatalf("bad account item %+v", l.res.Item)
				}
			} else if l.res.Item.ResultCode != 0 || value(l.res, "Tag_Profile_IM_Nick") == "" {
				t.Fatalf("good account %d item %+v", i, l.res.Item)
			}
		}
		// One failed call, then two calls per halving level down to the bad one.
		if n := len(up.Calls()); n > 1+2*7 {
			t.Fatalf("isolation took %d calls", n)
		}
	})
}

func TestThrottledRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(n int, r im.GetRequest) (*im.GetResponse, error) {
			switch n {
			case 1:
				return nil, &upstream.Error{Kind: im.KindThrottled, Code: 70050}
			case 2:
				return nil, &upstream.Error{Kind: im.KindThrottled, Code: 60007}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		ch := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		for range 3 {
			g.ch <- struct{}{}
		}
		if l := <-ch; l.err != nil || l.res.Item.ToAccount != "u1" {
			t.Fatalf("got %+v %v", l.res, l.err)
		}
		// A minute after 70050 (the upstream says so), ThrottleBackoff after 60007.
		if want := []time.Duration{im.SigFailureRetryAfter, 500 * time.Millisecond}; !slices.Equal(g.pauses, want) {
			t.Fatalf("pauses %v, want %v", g.pauses, want)
		}
		if g.backoffs.Load() != 2 {
			t.Fatalf("limiter backed off %d times, want 2", g.backoffs.Load())
		}
		if got := testutil.ToFloat64(h.m.UpstreamRetries.WithLabelValues("throttled")); got != 2 {
			t.Fatalf("throttled retries %v", got)
		}
	})
}

// cutGate is a gate whose rate is cut to f.
type cutGate struct {
	*gate
	f float64
}

func (c cutGate) Factor() float64 { return c.f }

// TestAdmitCountsCutAndPause: after a throttling answer Admit's estimate
// includes the pause asked of the limiter (a minute after 70050) and the
// cut rate, so lookups that cannot be served in time are answered at once.
func TestAdmitCountsCutAndPause(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(n int, r im.GetRequest) (*im.GetResponse, error) {
			if n == 1 {
				return nil, &upstream.Error{Kind: im.KindThrottled, Code: 70050}
			}
			return found(r), nil
		}}
		g := cutGate{gate: newGate(), f: 1}
		h := start(t, Config{Upstream: up, Limiter: rated{g, 100}})
		now := time.Now()
		if err := h.b.Admit(now.Add(5*time.Second), true); err != nil {
			t.Fatalf("Admit before any throttling: %v", err)
		}
		ch := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		g.ch <- struct{}{}
		g.ch <- struct{}{} // granted after the 70050 answer was handled
		if err := h.b.Admit(time.Now().Add(5*time.Second), true); !errors.Is(err, ErrWouldMiss) {
			t.Fatalf("Admit 5s ahead during the minute's pause = %v, want ErrWouldMiss", err)
		}
		if err := h.b.Admit(time.Now().Add(2*time.Minute), true); err != nil {
			t.Fatalf("Admit 2min ahead = %v", err)
		}
		// The pause is known: the estimate's margin is on the calls, not on
		// it (a quarter of a minute more would refuse this one).
		if err := h.b.Admit(time.Now().Add(65*time.Second), true); err != nil {
			t.Fatalf("Admit 65s ahead during the minute's pause = %v", err)
		}
		if l := <-ch; l.err != nil {
			t.Fatal(l.err)
		}
		// A rate cut to a tenth: 5 calls' worth of queue ahead takes ~0.5s.
		g2 := cutGate{gate: newGate(), f: 0.1}
		h2 := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: rated{g2, 100}, MaxAccounts: 1})
		for i := range 4 {
			loadAsync(h2.b, context.Background(), fmt.Sprint("q", i), "Tag_Profile_IM_Nick")
		}
		h2.waitQueued(t, 4)
		if err := h2.b.Admit(time.Now().Add(300*time.Millisecond), true); !errors.Is(err, ErrWouldMiss) {
			t.Fatalf("Admit 300ms ahead behind 5 calls at 10/s = %v, want ErrWouldMiss", err)
		}
		if err := h2.b.Admit(time.Now().Add(800*time.Millisecond), true); err != nil {
			t.Fatalf("Admit 800ms ahead behind 5 calls at 10/s = %v", err)
		}
		for range 4 {
			g2.ch <- struct{}{}
		}
	})
}

func TestTransientRetriesBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(int, im.GetRequest) (*im.GetResponse, error) {
			return nil, &upstream.Error{Kind: im.KindHTTP, Status: 502}
		}}
		h := start(t, Config{Upstream: up, Limiter: open{}, MaxAttempts: 3})
		_, err := h.b.Load(context.Background(), "u1", []string{"Tag_Profile_IM_Nick"})
		var ue *upstream.Error
		if !errors.As(err, &ue) || ue.Status != 502 {
			t.Fatalf("err = %v", err)
		}
		if n := len(up.Calls()); n != 3 {
			t.Fatalf("%d calls, want 3", n)
		}
	})
}

func TestAuthErrorNotRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(int, im.GetRequest) (*im.GetResponse, error) {
			return nil, &upstream.Error{Kind: im.KindAuth, Code: 70009}
		}}
		h := start(t, Config{Upstream: up, Limiter: open{}})
		if _, err := h.b.Load(context.Background(), "u1", []string{"Tag_Profile_IM_Nick"}); upstream.KindOf(err) != im.KindAuth {
			t.Fatalf("err = %v", err)
		}
		if n := len(up.Calls()); n != 1 {
			t.Fatalf("%d calls", n)
		}
	})
}

func TestPerItemTransientRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(n int, r im.GetRequest) (*im.GetResponse, error) {
			resp := found(r)
			for i := range resp.UserProfileItem {
				if n == 1 && resp.UserProfileItem[i].ToAccount == "flaky" {
					resp.UserProfileItem[i] = im.UserProfile{ToAccount: "flaky", ResultCode: 40006}
					resp.FailAccount = []string{"flaky"}
				}
				if resp.UserProfileItem[i].ToAccount == "ghost" {
					resp.UserProfileItem[i] = im.UserProfile{ToAccount: "ghost", ResultCode: 40003}
				}
			}
			return resp, nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		flaky := loadAsync(h.b, context.Background(), "flaky", "Tag_Profile_IM_Nick")
		ghost := loadAsync(h.b, context.Background(), "ghost", "Tag_Profile_IM_Nick")
		ok := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 3)
		g.ch <- struct{}{}
		g.ch <- struct{}{}
		if l := <-flaky; l.err != nil || l.res.Item.ResultCode != 0 || value(l.res, "Tag_Profile_IM_Nick") != "v-flaky-Tag_Profile_IM_Nick" {
			t.Fatalf("flaky: %+v %v", l.res.Item, l.err)
		}
		if l := <-ghost; l.err != nil || l.res.Item.ResultCode != 40003 {
			t.Fatalf("ghost: %+v %v", l.res.Item, l.err)
		}
		if l := <-ok; l.err != nil || l.res.Item.ResultCode != 0 {
			t.Fatalf("u1: %+v %v", l.res.Item, l.err)
		}
		calls := h.up.Calls()
		if len(calls) != 2 || !slices.Equal(calls[1].ToAccount, []string{"flaky"}) {
			t.Fatalf("calls %+v", calls)
		}
	})
}

// TestCancellation: one caller leaving does not cancel a shared slot; an
// account whose every caller left is not sent.
func TestCancellation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }}, Limiter: g})
		ctx1, cancel1 := context.WithCancel(context.Background())
		ctx2, cancel2 := context.WithCancel(context.Background())
		leaver := loadAsync(h.b, ctx1, "shared", "Tag_Profile_IM_Nick")
		stayer := loadAsync(h.b, context.Background(), "shared", "Tag_Profile_IM_Nick")
		gone := loadAsync(h.b, ctx2, "gone", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 2)
		h.waitWaiters(t, "shared", 2)
		cancel1()
		cancel2()
		if l := <-leaver; !errors.Is(l.err, context.Canceled) {
			t.Fatalf("leaver: %v", l.err)
		}
		if l := <-gone; !errors.Is(l.err, context.Canceled) {
			t.Fatalf("gone: %v", l.err)
		}
		g.ch <- struct{}{}
		if l := <-stayer; l.err != nil || l.res.Item.ToAccount != "shared" {
			t.Fatalf("stayer: %+v %v", l.res, l.err)
		}
		calls := h.up.Calls()
		if len(calls) != 1 || !slices.Equal(calls[0].ToAccount, []string{"shared"}) {
			t.Fatalf("calls %+v: the abandoned account was sent", calls)
		}
	})
}

// TestShutdownFlushes stops Run with lookups queued: they are still sent
// (under the limiter) and answered; later loads fail with ErrClosed.
func TestShutdownFlushes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }}, Limiter: g})
		var chans []chan loaded
		for i := range 150 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 150)
		stopped := make(chan struct{})
		go func() { h.stop(); close(stopped) }()
		g.ch <- struct{}{}
		g.ch <- struct{}{}
		<-stopped
		for i, ch := range chans {
			if l := <-ch; l.err != nil {
				t.Fatalf("caller %d lost in shutdown: %v", i, l.err)
			}
		}
		if _, err := h.b.Load(context.Background(), "late", nil); !errors.Is(err, ErrClosed) {
			t.Fatalf("Load after shutdown: %v", err)
		}
	})
}

// TestShutdownDrainTimeout: when no token comes, queued lookups are failed
// with ErrClosed after DrainTimeout, not left hanging.
func TestShutdownDrainTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: g, DrainTimeout: 50 * time.Millisecond})
		ch := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 1)
		h.stop()
		if l := <-ch; !errors.Is(l.err, ErrClosed) {
			t.Fatalf("err = %v", l.err)
		}
	})
}

func TestNewValidates(t *testing.T) {
	up := &fakeUpstream{}
	for _, cfg := range []Config{{}, {Upstream: up}, {Upstream: up, Limiter: open{}, MaxAccounts: 101}} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
}

func TestFillWait(t *testing.T) {
	ms := time.Millisecond
	for _, c := range []struct {
		age           time.Duration
		queued, limit int
		hold, want    time.Duration
	}{
		{10 * ms, 50, 100, 40 * ms, 10 * ms}, // fills in 20ms: wait the other 10
		{30 * ms, 75, 100, 40 * ms, 10 * ms}, // fills in 40ms
		{10 * ms, 10, 100, 40 * ms, 0},       // would take 100ms: go now
		{10 * ms, 100, 100, 40 * ms, 0},      // full
		{0, 1, 100, 40 * ms, 0},              // just arrived: no pace known, fills "at once"
		{10 * ms, 50, 100, -1, 0},            // holding off
	} {
		if got := fillWait(c.age, c.queued, c.limit, c.hold); got != c.want {
			t.Errorf("fillWait(%v, %d, %d, %v) = %v, want %v", c.age, c.queued, c.limit, c.hold, got, c.want)
		}
	}
}
