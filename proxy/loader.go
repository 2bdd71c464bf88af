package proxy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
)

// batchLoader makes the batcher the cache's Loader. It lives here, where
// both are wired, so that the cache knows nothing of the batcher.
type batchLoader struct{ b *batcher.Batcher }

var _ cache.Loader = batchLoader{}

// Admit admits a request's missed accounts whole (batcher.Reserve).
func (l batchLoader) Admit(n int, deadline time.Time, ok bool) (cache.Ticket, error) {
	r, err := l.b.Reserve(n, deadline, ok)
	if err != nil {
		return nil, loadError(err) // not a nil *Reservation in a non-nil Ticket
	}
	return r, nil
}

func (l batchLoader) Load(ctx context.Context, lk cache.Lookup) (cache.Fetched, error) {
	r, _ := lk.Ticket.(*batcher.Reservation) // Admit's own, or none
	res, err := l.b.LoadWith(ctx, lk.Account, lk.Tags,
		batcher.LoadOptions{Deadline: lk.Deadline, Background: lk.Background, Reservation: r})
	return cache.Fetched{Item: res.Item, Tags: res.Tags, Sent: res.Sent}, loadError(err)
}

// loadError marks the batcher's refusals with the cache's errors, which
// the HTTP layer answers, keeping the batcher's for logs and errors.Is.
func loadError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, batcher.ErrOverloaded), errors.Is(err, batcher.ErrWouldMiss):
		return fmt.Errorf("%w: %w", cache.ErrOverloaded, err)
	case errors.Is(err, batcher.ErrClosed):
		return fmt.Errorf("%w: %w", cache.ErrClosed, err)
	}
	return err
}

func (l batchLoader) Promote(account string) { l.b.Promote(account) }
