package batcher

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestRefreshesYieldToMisses fills the queue with background refreshes
// while no grant is free, then lets misses arrive past MaxQueue: every miss
// is queued (the oldest refreshes are shed for them), Admit does not count
// the refreshes, the first grant carries misses only and the refreshes
// ride in the space the misses leave; a miss for an account queued as a
// refresh is served as a miss.
func TestRefreshesYieldToMisses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: rated{g, 10}, MaxQueue: 200})
		bg := LoadOptions{Background: func() bool { return true }}
		var refreshes []chan loaded
		for i := range 150 {
			refreshes = append(refreshes, loadAsyncWith(h.b, context.Background(), bg, fmt.Sprintf("r%d", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 150)
		// 150 queued refreshes would be two calls at 10/s ahead; they are none.
		if err := h.b.Admit(time.Now().Add(150*time.Millisecond), true); err != nil {
			t.Fatalf("Admit with only refreshes queued = %v", err)
		}
		misses := []chan loaded{loadAsync(h.b, context.Background(), "r149", "Tag_Profile_IM_Nick")}
		waitForeground(t, h.b, 1) // the miss for r149 promoted its refresh
		for i := range 149 {
			misses = append(misses, loadAsync(h.b, context.Background(), fmt.Sprintf("m%d", i), "Tag_Profile_IM_Nick"))
		}
		// 150 misses + 50 refreshes fill MaxQueue: 99 refreshes were shed.
		waitForeground(t, h.b, 150)
		h.waitQueued(t, 200)
		if n := testutil.ToFloat64(h.m.RefreshShed); n != 99 {
			t.Fatalf("refresh_shed_total %v, want 99", n)
		}
		// A refresh beyond the bound, with live refreshes queued, is refused.
		if _, err := h.b.LoadWith(context.Background(), "late", []string{"Tag_Profile_IM_Nick"}, bg); !errors.Is(err, ErrOverloaded) {
			t.Fatalf("refresh over the bound: %v", err)
		}
		g.ch <- struct{}{}
		synctest.Wait() // the first call is made before the second grant
		if n := len(h.up.Calls()); n != 1 {
			t.Fatalf("%d calls after the first grant, want 1", n)
		}
		g.ch <- struct{}{}
		for i, ch := range misses {
			if l := <-ch; l.err != nil || !strings.HasPrefix(value(l.res, "Tag_Profile_IM_Nick"), "v-"+l.res.Item.ToAccount) {
				t.Fatalf("miss %d: %+v, %v", i, l.res.Item, l.err)
			}
		}
		shed, served := 0, 0
		for i, ch := range refreshes {
			switch l := <-ch; {
			case errors.Is(l.err, ErrOverloaded):
				shed++
			case l.err == nil && l.res.Item.ToAccount == fmt.Sprintf("r%d", i):
				served++
			default:
				t.Fatalf("refresh r%d: %+v, %v", i, l.res.Item, l.err)
			}
		}
		if shed != 99 || served != 51 {
			t.Fatalf("%d refreshes shed, %d served; want 99, 51", shed, served)
		}
		calls := h.up.Calls()
		if len(calls) != 2 {
			t.Fatalf("%d calls, want 2", len(calls))
		}
		isRefresh := func(a string) bool { return strings.HasPrefix(a, "r") && a != "r149" }
		var first, second int
		for _, a := range calls[0].ToAccount {
			if isRefresh(a) {
				first++
			}
		}
		for _, a := range calls[1].ToAccount {
			if isRefresh(a) {
				second++
			}
		}
		if len(calls[0].ToAccount) != 100 || first != 0 || len(calls[1].ToAccount) != 100 || second != 50 {
			t.Fatalf("calls of %d (%d refreshes) and %d (%d refreshes), want 100 misses, then 50 misses + 50 refreshes",
				len(calls[0].ToAccount), first, len(calls[1].ToAccount), second)
		}
	})
}

// TestPromoteMovesRefreshAhead: a foreground caller joining a queued
// refresh without a Load of its own (Promote) puts it among the misses.
func TestPromoteMovesRefreshAhead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: g, MaxAccounts: 2})
		bg := LoadOptions{Background: func() bool { return true }}
		a := loadAsyncWith(h.b, context.Background(), bg, "a", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 1)
		b := loadAsyncWith(h.b, context.Background(), bg, "b", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 2)
		m := loadAsync(h.b, context.Background(), "m", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 3)
		h.b.Promote("b")
		h.b.Promote("nobody")
		g.ch <- struct{}{}
		g.ch <- struct{}{}
		for _, ch := range []chan loaded{a, b, m} {
			if l := <-ch; l.err != nil {
				t.Fatal(l.err)
			}
		}
		calls := h.up.Calls()
		if len(calls) != 2 || strings.Join(calls[0].ToAccount, ",") != "m,b" || strings.Join(calls[1].ToAccount, ",") != "a" {
			t.Fatalf("calls %+v, want [m b] then [a]", calls)
		}
	})
}

// waitForeground waits until every other goroutine in the bubble is blocked
// and checks that n foreground accounts are queued then.
func waitForeground(t *testing.T, b *Batcher, n int) {
	t.Helper()
	synctest.Wait()
	b.mu.Lock()
	q := b.queued
	b.mu.Unlock()
	if q != n {
		t.Fatalf("%d foreground accounts queued, want %d", q, n)
	}
}
