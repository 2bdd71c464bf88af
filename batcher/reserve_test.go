package batcher

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// TestReserveAdmitsRequestsWhole: 100 requests of 10 accounts arrive at
// once with 460 ms left, at a quota of 10 calls/s: three calls' worth (30
// requests; the fourth call's 400 ms with the estimate's quarter of margin
// is 500 ms, past the deadline) are admitted whole, the rest refused whole,
// though nothing is queued yet when they arrive; MaxQueue counts reserved
// places too.
func TestReserveAdmitsRequestsWhole(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: rated{g, 10}, MaxQueue: 1000})
		deadline := time.Now().Add(460 * time.Millisecond)
		var admitted, wouldMiss atomic.Int64
		var mu sync.Mutex
		var held []*Reservation
		var wg sync.WaitGroup
		for range 100 {
			wg.Go(func() {
				r, err := h.b.Reserve(10, deadline, true)
				switch {
				case err == nil:
					admitted.Add(1)
					mu.Lock()
					held = append(held, r)
					mu.Unlock()
				case errors.Is(err, ErrWouldMiss):
					wouldMiss.Add(1)
				default:
					t.Error(err)
				}
			})
		}
		wg.Wait()
		if admitted.Load() != 30 || wouldMiss.Load() != 70 {
			t.Fatalf("%d requests admitted, %d refused; want 30, 70", admitted.Load(), wouldMiss.Load())
		}
		for _, r := range held {
			r.Release()
			r.Release() // twice: nothing more
		}
		if r, err := h.b.Reserve(900, time.Time{}, false); err != nil {
			t.Fatalf("after release: %v", err)
		} else if _, err := h.b.Reserve(101, time.Time{}, false); !errors.Is(err, ErrOverloaded) {
			t.Fatalf("900 reserved + 101 over MaxQueue 1000: %v", err)
		} else {
			r.Release()
		}

		// Loads carrying a reservation take its places: queued, not counted twice.
		r, err := h.b.Reserve(3, time.Time{}, false)
		if err != nil {
			t.Fatal(err)
		}
		opt := LoadOptions{Reservation: r}
		var chans []chan loaded
		for i := range 2 {
			chans = append(chans, loadAsyncWith(h.b, context.Background(), opt, fmt.Sprint("u", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 2)
		h.b.mu.Lock()
		reserved, left := h.b.reserved, r.left
		h.b.mu.Unlock()
		if reserved != 1 || left != 1 {
			t.Fatalf("after 2 of 3 Loads: %d reserved, %d left", reserved, left)
		}
		r.Release()
		h.b.mu.Lock()
		reserved = h.b.reserved
		h.b.mu.Unlock()
		if reserved != 0 {
			t.Fatalf("%d reserved after Release", reserved)
		}
		g.ch <- struct{}{}
		for _, ch := range chans {
			if l := <-ch; l.err != nil {
				t.Fatal(l.err)
			}
		}
	})
}
