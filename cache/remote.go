package cache

import (
	"context"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// Feed is the optional part of a Remote that carries profile changes to
// every replica. The Redis tier (cache/redistier) satisfies it with a
// pub/sub channel per app.
type Feed interface {
	// Change writes account's changed tags to the tier (versioned: never
	// over newer values) and announces them to every replica, before it
	// returns. With existing, only fields the tier already holds are
	// written, and no key is created or kept longer.
	Change(ctx context.Context, account string, rec *Record, existing bool) error
	// Follow calls apply for each change another replica announces, and
	// lost when changes may have been missed (the feed was cut and is
	// back). It returns when ctx ends.
	Follow(ctx context.Context, apply func(account string, rec *Record, sent time.Time), lost func())
}

// What a shared tier implemented outside this package (cache/redistier)
// uses of the record model, so that it stores, decodes and keeps records by
// the cache's rules rather than by copies of them.

// Put sets v in r, replacing r's entry for the same tag, with the tag's
// name interned (standard tags share one string). Only for records not yet
// stored, such as one a tier is decoding.
func (r *Record) Put(v TagValue) {
	v.Tag = intern(v.Tag)
	r.put(v)
}

// Merge returns what a tier holds after storing upd over old, by the rules
// of supersedes (see merge); old itself when nothing of upd applies. skew
// is the clock skew in milliseconds. Local applies it; a tier that cannot
// call it (a Redis script) implements the same rules, and its tests compare
// the two.
func Merge(old, upd *Record, skew int64) *Record { return merge(old, upd, skew) }

// NoDataRecord is the record the cache stores for a fetch sent at ver
// (Unix ms) answered "no data of class cls" with info, until until (see
// nodata.go).
func NoDataRecord(cls im.TagClass, info string, ver int64, until time.Time) *Record {
	return noDataRecord(cls, info, ver, until)
}

// Answer is the item a lookup of tags for account answers from r at now,
// by the rules the lookup path applies (r must not be nil).
func (r *Record) Answer(account string, tags []string, now time.Time) im.UserProfile {
	return pick(account, r, tags, now)
}
