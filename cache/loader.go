package cache

import (
	"context"
	"errors"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// Loader fetches what the tiers miss (in the proxy: the batcher, through
// an adapter). The cache calls it in one order per request: Admit once for
// the request's missed accounts, then Load once per flight it starts, and
// Promote when a foreground caller joins a flight a background refresh
// started. A Loader is used concurrently.
type Loader interface {
	// Admit admits a request's n missed accounts whole or refuses them
	// whole, on arrival: an error (the cache answers every one of them with
	// a stale value or the error) when they cannot all be answered by
	// deadline (hasDeadline false: none) or do not fit. Admitted, the
	// Ticket holds their places until the request's Loads use them or the
	// cache releases it when the request ends; a nil Ticket holds nothing.
	Admit(n int, deadline time.Time, hasDeadline bool) (Ticket, error)
	// Load fetches one account's tags; the result may carry more tags
	// than asked for. ctx ends when no caller waits any more.
	Load(ctx context.Context, l Lookup) (Fetched, error)
	// Promote makes account's lookup, if it waits as a background
	// refresh, a foreground one.
	Promote(account string)
}

// Errors a Loader reports through (errors.Is) so that callers of the cache
// can answer them without knowing the Loader: the HTTP layer maps them to
// IM codes.
var (
	// ErrOverloaded: the lookup was refused, or shed, because the upstream
	// quota cannot serve it in time; asking again later may succeed.
	ErrOverloaded = errors.New("cache: loader overloaded")
	// ErrClosed: the Loader is shutting down.
	ErrClosed = errors.New("cache: loader closed")
)

// Refusal is how a Loader reports a refusal: errors.Is(r, Kind) holds
// (ErrOverloaded or ErrClosed), Cause is its own error (for errors.Is and
// logs), and Words say why in terms a caller can read.
type Refusal struct {
	Kind  error
	Cause error
	Words string
}

func (r *Refusal) Error() string   { return r.Kind.Error() + ": " + r.Cause.Error() }
func (r *Refusal) Unwrap() []error { return []error{r.Kind, r.Cause} }

// Ticket is the places Admit holds for one request. Release gives back
// those no Load used; it may be called more than once.
type Ticket interface{ Release() }

// Lookup is one Load: an account and tags for the callers of one flight.
type Lookup struct {
	Account string
	Tags    []string
	// Deadline tells the latest deadline among the flight's callers
	// (false: some caller has none). It changes as callers join; Load's
	// context has no deadline of its own. It takes no lock and does not
	// block, so a Loader may call it under its own locks.
	Deadline func() (time.Time, bool)
	// Background, if set, tells whether every caller so far is a
	// background refresh (the same rules as Deadline). Unset: a foreground
	// lookup. A lookup that stops being background after the Loader read
	// this is moved with Promote.
	Background func() bool
	// Ticket is the starting caller's admission (nil for refreshes).
	Ticket Ticket
}

// Fetched is one account's fetched answer: the upstream's item (every
// fetched tag it returned, or a non-zero ResultCode) and the TagList that
// was fetched, so the cache can tell an unset tag from one not asked for.
type Fetched struct {
	Item im.UserProfile
	Tags []string
	// Sent is when the call that answered was sent: the answer reflects
	// the upstream's data at Sent or later (the cache orders writes by it).
	// Zero: the cache takes the time it asked the Loader.
	Sent time.Time
}
