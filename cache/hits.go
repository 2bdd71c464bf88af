package cache

import "github.com/portrait-proxy/portrait-proxy/im"

// sourceRefresh marks, inside Hits only, an answer served past fresh whose
// refresh is yet to start; every such answer leaves Hits as SourceLocal.
const sourceRefresh Source = "local, refresh"

// Hits answers accounts for tags from the in-process tier alone, into
// buffers the caller owns, for the hit path: no allocation once the
// buffers are large enough, no waiting, no context.
//
// It appends one Answer per account, in order, to dst, and the values of
// all of them to items (each answer's ProfileItem is its own part of items,
// capped: appending to it never overwrites another's); either buffer grows
// by append only when too small. ok is true when every account was
// answered from the in-process tier as Get would answer it there: a fresh
// value, a cached "no such account" or "no data" answer, or a value past
// fresh (then its background refresh starts, as Get's does). The hit and
// stale counters are then counted as Get counts them.
//
// ok is false when some account is not servable from the tier (absent,
// expired, a tag missing, or no tier). Nothing is counted and no refresh
// starts: the caller asks Get, which counts each account once. The
// returned slices then have the lengths of dst and items (their backing
// arrays may have grown, so keep them for reuse), and what lies past those
// lengths is unspecified.
//
// Lifetime: the answers and their ProfileItems live in the caller's
// buffers; they stay intact until the caller passes those buffers (or
// slices of them) to Hits again, or writes to them. Tag strings are those
// of tags, ToAccount those of accounts, and Values are shared with the
// tier's records, which are never modified: the caller must not modify
// them either (as with Get's answers). A "no data" answer (40807/40809)
// allocates its ResultInfo text.
//
// Hits is safe for concurrent use with other methods; each concurrent
// caller needs its own buffers.
func (c *Cache) Hits(dst []Answer, items []im.ProfileItem, accounts, tags []string) (answers []Answer, itemsOut []im.ProfileItem, ok bool) {
	now := c.now()
	n0, i0 := len(dst), len(items)
	stale := 0
	for _, a := range accounts {
		rec := c.local.Get(a, now)
		st := rec.state(tags, now)
		if st == stateMiss {
			return dst[:n0], items[:i0], false
		}
		var it im.UserProfile
		it, items = appendPick(items, a, rec, tags, now)
		src := SourceLocal
		if st == stateStale {
			src = sourceRefresh
			stale++
		}
		dst = append(dst, Answer{Item: it, Source: src})
	}
	// Counted only now that every account is answered: a caller that falls
	// back to Get must not count an account twice.
	c.localHit.Add(float64(len(accounts) - stale))
	if stale > 0 {
		c.localStale.Add(float64(stale))
		for i := n0; i < len(dst); i++ {
			if dst[i].Source == sourceRefresh {
				dst[i].Source = SourceLocal
				c.refresh(accounts[i-n0], tags)
			}
		}
	}
	return dst, items, true
}
