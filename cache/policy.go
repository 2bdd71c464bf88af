package cache

import "time"

// State is how well a record serves a set of tags at a time (see Serves).
type State int

// States of a record for a set of tags.
const (
	StateMiss     = State(stateMiss)     // some tag absent or past its stale time
	StateStale    = State(stateStale)    // every tag servable, some past fresh: served while refreshed
	StateFresh    = State(stateFresh)    // every tag fresh
	StateNotFound = State(stateNotFound) // a live negative entry ("no such account")
)

// Serves reports how r serves tags at now, by the rules the lookup path
// applies (a nil record is a miss). It and Fetched exist so that tools
// replaying workloads in simulated time (cmd/capsim) run the cache's own
// rules, not a copy of them.
func (r *Record) Serves(tags []string, now time.Time) State { return State(r.state(tags, now)) }

// Fetched returns the record c stores for a loaded result at now: fresh
// for TTL, servable stale for StaleTTL after, a negative entry for
// NegativeTTL when the account does not exist, and nil for an outcome that
// is not cached (a transient failure).
func (c *Cache) Fetched(res Fetched, now time.Time) *Record { return c.recordOf(res, now) }
