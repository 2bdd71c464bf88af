package cache

import (
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// A failed background refresh leaves a backoff mark; once the backoff is
// over the mark is forgotten, so the map does not grow with every account
// that ever failed.
func TestFailedRefreshMarksExpire(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{}
		clk := newClock()
		const backoff = 20 * time.Millisecond
		c, err := New(Config{Loader: up, TTL: time.Minute, StaleTTL: time.Hour, RefreshBackoff: backoff, Now: clk.Now})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
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
		// The sweeper runs every backoff on the bubble's clock: let one pass.
		time.Sleep(backoff)
		synctest.Wait()
		if n := marks(); n != 0 {
			t.Fatalf("%d marks kept after their backoff", n)
		}
	})
}

// A fetch sent before a change and answered after the account's record
// left the in-process tier (evicted) does not put the old value back.
func TestLateFetchAfterEvictionNotReinstated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := &gate{started: make(chan struct{}), release: make(chan string)}
		local := NewLocal(0)
		c, err := New(Config{Loader: g, Local: local})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
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
		time.Sleep(DefaultClockSkew + 100*time.Millisecond) // past the 1s skew, on the bubble's clock
		go func() { done <- nickOf(t, c, "u1") }()
		<-g.started
		g.release <- "new"
		<-done
		if local.Get("u1", time.Now()) == nil {
			t.Fatal("a fetch sent after the change was not stored")
		}
	})
}
