package cache

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// recLoader records what the cache asks of its Loader. Its Loads block
// until release is closed, whatever their context says.
type recLoader struct {
	refuse  error // Admit's answer
	release chan struct{}
	freed   sync.Once
	loads   chan recLoad // each Load as it starts

	mu       sync.Mutex
	admits   []int
	released int
	promoted []string
}

type recLoad struct {
	ctx context.Context
	lk  Lookup
}

type recTicket struct{ l *recLoader }

func (t *recTicket) Release() {
	t.l.mu.Lock()
	t.l.released++
	t.l.mu.Unlock()
}

func newRecLoader() *recLoader {
	return &recLoader{release: make(chan struct{}), loads: make(chan recLoad, 16)}
}

// free lets every Load, blocked or to come, return.
func (l *recLoader) free() { l.freed.Do(func() { close(l.release) }) }

func (l *recLoader) Admit(n int, _ time.Time, _ bool) (Ticket, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.admits = append(l.admits, n)
	if l.refuse != nil {
		return nil, l.refuse
	}
	return &recTicket{l}, nil
}

func (l *recLoader) Load(ctx context.Context, lk Lookup) (Fetched, error) {
	l.loads <- recLoad{ctx, lk}
	<-l.release
	return Fetched{Tags: lk.Tags, Item: item(lk.Account, nick, "v")}, nil
}

func (l *recLoader) Promote(account string) {
	l.mu.Lock()
	l.promoted = append(l.promoted, account)
	l.mu.Unlock()
}

func newRecCache(t *testing.T, l *recLoader) (*Cache, *metrics.Metrics) {
	t.Helper()
	m := metrics.New(prometheus.NewRegistry())
	c, err := New(Config{Loader: l, Metrics: m})
	if err != nil {
		t.Fatal(err)
	}
	return c, m
}

// TestLoaderAdmission: a request's missed accounts are admitted with one
// Admit; refused, every one of them gets the error and nothing is loaded;
// admitted, the flights the request starts load with its Ticket, which is
// released when the request ends.
func TestLoaderAdmission(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		refused := errors.New("no room")
		l := newRecLoader()
		l.refuse = refused
		c, m := newRecCache(t, l)
		defer c.Close()
		defer l.free()
		for _, a := range c.Get(context.Background(), []string{"a", "b"}, []string{nick}) {
			if !errors.Is(a.Err, refused) {
				t.Fatalf("refused request answered %+v", a)
			}
		}
		if n := testutil.ToFloat64(m.Shed); n != 2 {
			t.Fatalf("shed_lookups_total %v, want 2", n)
		}
		synctest.Wait()
		if len(l.loads) != 0 {
			t.Fatalf("%d loads for a refused request", len(l.loads))
		}

		l.refuse = nil
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		dl, _ := ctx.Deadline()
		done := make(chan []Answer, 1)
		go func() { done <- c.Get(ctx, []string{"a", "b"}, []string{nick}) }()
		for range 2 {
			ld := <-l.loads
			if ld.lk.Ticket == nil || ld.lk.Background != nil {
				t.Fatalf("lookup %+v: want the request's ticket, foreground", ld.lk)
			}
			if got, ok := ld.lk.Deadline(); !ok || !got.Equal(dl) {
				t.Fatalf("lookup deadline %v %v, want the caller's %v", got, ok, dl)
			}
			if _, ok := ld.ctx.Deadline(); ok {
				t.Fatal("the load's context has a deadline of its own")
			}
		}
		l.free()
		for _, a := range <-done {
			if a.Err != nil || a.Source != SourceUpstream {
				t.Fatalf("admitted request answered %+v", a)
			}
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		if !slices.Equal(l.admits, []int{2, 2}) || l.released != 1 {
			t.Fatalf("admits %v, %d tickets released; want [2 2], 1", l.admits, l.released)
		}
	})
}

// TestFlightMergesCallers: what the Loader reads about a flight's callers
// follows them as they join: the latest deadline until one has none; a
// refresh's flight is background until a foreground caller joins, who
// promotes it.
func TestFlightMergesCallers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newRecLoader()
		c, _ := newRecCache(t, l)
		defer c.Close()
		defer l.free()
		get := func(account string, d time.Duration) {
			ctx, cancel := context.Background(), context.CancelFunc(func() {})
			if d > 0 {
				ctx, cancel = context.WithTimeout(ctx, d)
			}
			go func() { defer cancel(); c.Get(ctx, []string{account}, []string{nick}) }()
			synctest.Wait()
		}
		deadline := func(lk Lookup) time.Duration {
			d, ok := lk.Deadline()
			if !ok {
				return -1
			}
			return time.Until(d)
		}

		get("u1", 2*time.Second)
		lk := (<-l.loads).lk
		if got := deadline(lk); got != 2*time.Second {
			t.Fatalf("flight deadline in %v, want its caller's 2s", got)
		}
		for _, step := range []struct {
			join time.Duration // the joining caller's deadline; 0: none
			want time.Duration // the flight's after; -1: none
		}{{5 * time.Second, 5 * time.Second}, {time.Second, 5 * time.Second}, {0, -1}, {3 * time.Second, -1}} {
			get("u1", step.join)
			if got := deadline(lk); got != step.want {
				t.Fatalf("after a caller with deadline %v: flight deadline in %v, want %v", step.join, got, step.want)
			}
		}

		c.refresh("u2", []string{nick})
		lk = (<-l.loads).lk
		if lk.Background == nil || !lk.Background() {
			t.Fatal("a refresh's flight is not background")
		}
		if got := deadline(lk); got != c.cfg.RefreshTimeout {
			t.Fatalf("refresh flight deadline in %v, want %v", got, c.cfg.RefreshTimeout)
		}
		get("u2", 0)
		l.mu.Lock()
		promoted := slices.Clone(l.promoted)
		l.mu.Unlock()
		if lk.Background() || !slices.Equal(promoted, []string{"u2"}) {
			t.Fatalf("after a foreground caller: background %v, promoted %v", lk.Background(), promoted)
		}
	})
}

// TestFlightEndsWithLastCaller: when the last caller leaves, the flight's
// context ends; a caller after that starts a new load under a live
// context, even while the ended load still runs.
func TestFlightEndsWithLastCaller(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newRecLoader()
		c, _ := newRecCache(t, l)
		defer c.Close()
		defer l.free()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan Answer, 2)
		go func() { done <- c.Get(ctx, []string{"u1"}, []string{nick})[0] }()
		first := <-l.loads
		cancel()
		if a := <-done; !errors.Is(a.Err, context.Canceled) {
			t.Fatalf("caller who left answered %+v", a)
		}
		if first.ctx.Err() == nil {
			t.Fatal("the flight's context outlived its last caller")
		}
		go func() { done <- c.Get(context.Background(), []string{"u1"}, []string{nick})[0] }()
		synctest.Wait()
		if len(l.loads) != 1 {
			t.Fatalf("%d new loads after the flight ended, want 1 (a caller joined the ended call)", len(l.loads))
		}
		if second := <-l.loads; second.ctx.Err() != nil {
			t.Fatal("the new load's context is cancelled")
		}
		l.free()
		if a := <-done; a.Err != nil || a.Source != SourceUpstream {
			t.Fatalf("new caller answered %+v", a)
		}
	})
}
