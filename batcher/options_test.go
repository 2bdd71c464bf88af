package batcher

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// TestLoadOptionsDeadline: a lookup whose Deadline says its callers are
// gone by dispatch is dropped (ErrWouldMiss) though its context has no
// deadline; the Deadline is asked at dispatch, not when queued.
func TestLoadOptionsDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: g})
		late := make(chan struct{})
		until := func() (time.Time, bool) {
			select {
			case <-late:
				return time.Now().Add(-time.Second), true
			default:
				return time.Now().Add(time.Hour), true
			}
		}
		gone := loadAsyncWith(h.b, context.Background(), LoadOptions{Deadline: until}, "gone", "Tag_Profile_IM_Nick")
		open := loadAsyncWith(h.b, context.Background(), LoadOptions{Deadline: func() (time.Time, bool) { return time.Time{}, false }},
			"open", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 2)
		close(late)
		g.ch <- struct{}{}
		if l := <-gone; !errors.Is(l.err, ErrWouldMiss) {
			t.Fatalf("lookup whose callers are gone: %+v, %v; want ErrWouldMiss", l.res.Item, l.err)
		}
		if l := <-open; l.err != nil {
			t.Fatalf("lookup without a deadline: %v", l.err)
		}
		if calls := h.up.Calls(); len(calls) != 1 || strings.Join(calls[0].ToAccount, ",") != "open" {
			t.Fatalf("calls %+v, want one for open alone", calls)
		}
	})
}
