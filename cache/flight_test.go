package cache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFlightDeadlineFarFuture: the deadline a flight reports to its Loader
// (Lookup.Deadline) is its caller's however far away, or none. Kept as
// Unix nanoseconds, a time after 2262 came back as one in the past, and
// the batcher (hopeless) drops a lookup whose deadline has passed with
// ErrWouldMiss: the caller was refused for waiting too long.
func TestFlightDeadlineFarFuture(t *testing.T) {
	l := newRecLoader()
	c, _ := newRecCache(t, l)
	defer c.Close()
	defer l.free()
	far := time.Now().AddDate(300, 0, 0)
	ctx, cancel := context.WithDeadline(context.Background(), far)
	defer cancel()
	done := make(chan []Answer, 1)
	go func() { done <- c.Get(ctx, []string{"a"}, []string{nick}) }()
	ld := <-l.loads
	got, ok := ld.lk.Deadline()
	if ok && got.Before(time.Now()) {
		t.Errorf("Lookup.Deadline() = %v, %v for a caller whose deadline is %v: in the past, the batcher drops the lookup", got, ok, far)
	}
	if ok && !got.Equal(far) {
		t.Errorf("Lookup.Deadline() = %v, want the caller's %v", got, far)
	}
	l.free()
	<-done
}

// slowLoader answers after a short random delay, or with its context's
// error when the flight's context ends first.
type slowLoader struct{}

func (slowLoader) Admit(int, time.Time, bool) (Ticket, error) { return nil, nil }
func (slowLoader) Promote(string)                             {}
func (slowLoader) Load(ctx context.Context, lk Lookup) (Fetched, error) {
	t := time.NewTimer(time.Duration(rand.IntN(300)) * time.Microsecond)
	defer t.Stop()
	select {
	case <-t.C:
		return Fetched{Tags: lk.Tags, Item: item(lk.Account, nick, "v")}, nil
	case <-ctx.Done():
		return Fetched{}, ctx.Err()
	}
}

// TestFlightNeverCancelledUnderLiveCaller: callers that give up early
// (their flight's context ends when the last of them leaves) and callers
// that wait share flights of a few keys; a caller that still waits must
// never be answered with a cancelled flight's error.
func TestFlightNeverCancelledUnderLiveCaller(t *testing.T) {
	c, err := New(Config{Loader: slowLoader{}, Local: NewLocal(-1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	var bad atomic.Int64
	for g := range 16 {
		wg.Go(func() {
			for i := range 400 {
				acct := []string{fmt.Sprint("a", (g+i)%3)}
				if i%2 == 0 {
					ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rand.IntN(200))*time.Microsecond)
					c.Get(ctx, acct, []string{nick})
					cancel()
					continue
				}
				a := c.Get(context.Background(), acct, []string{nick})[0]
				if a.Err != nil {
					bad.Add(1)
					t.Errorf("waiting caller answered %v", a.Err)
				}
			}
		})
	}
	wg.Wait()
	if bad.Load() > 0 {
		t.Fatalf("%d waiting callers got a cancelled flight's error", bad.Load())
	}
}
