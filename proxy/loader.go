package proxy

import (
	"context"
	"errors"
	"strings"
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

// loadError reports the batcher's refusals as cache.Refusals, which the
// HTTP layer answers, keeping the batcher's error for logs and errors.Is.
func loadError(err error) error {
	var kind error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, batcher.ErrOverloaded), errors.Is(err, batcher.ErrWouldMiss):
		kind = cache.ErrOverloaded
	case errors.Is(err, batcher.ErrClosed):
		kind = cache.ErrClosed
	default:
		return err
	}
	return &cache.Refusal{Kind: kind, Cause: err, Words: strings.TrimPrefix(err.Error(), "batcher: ")}
}

func (l batchLoader) Promote(account string) { l.b.Promote(account) }
