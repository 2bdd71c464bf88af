package proxy

import (
	"context"
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
		return nil, err // not a nil *Reservation in a non-nil Ticket
	}
	return r, nil
}

func (l batchLoader) Load(ctx context.Context, lk cache.Lookup) (cache.Fetched, error) {
	r, _ := lk.Ticket.(*batcher.Reservation) // Admit's own, or none
	res, err := l.b.LoadWith(ctx, lk.Account, lk.Tags,
		batcher.LoadOptions{Deadline: lk.Deadline, Background: lk.Background, Reservation: r})
	return cache.Fetched{Item: res.Item, Tags: res.Tags, Sent: res.Sent}, err
}

func (l batchLoader) Promote(account string) { l.b.Promote(account) }
