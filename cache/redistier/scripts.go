package redistier

import (
	"context"
	_ "embed"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/cache"
)

// writeScript writes one account's fields, each only if it supersedes the
// field stored (the rules of cache.Merge, on the encoded form). A write
// that stores a tag clears the negative entry, unless it is known as of a
// time before that entry (an invalidation always clears); a negative entry
// is stored only if no stored tag is newer, and then replaces every tag; a
// class entry (cache.MarkerStandard, cache.MarkerCustom) is stored only if
// it supersedes every stored field of its class, and a stored field of a
// class removes that class's entry unless the entry supersedes it; the
// same callback again changes nothing. Its keys and arguments are
// writeArgs's; it returns the number of fields stored.
var writeScript = redis.NewScript(writeLua)

//go:embed scripts/write.lua
var writeLua string

// Modes of writeScript (writeArgs.mode).
const (
	writeMerge    = "0" // merge the fields, keep the key TTL-long
	writeRelease  = "1" // the same, and drop the claim marker (a fetch's write-back)
	writeExisting = "2" // only fields the hash holds; no negative entry, no new key, TTL untouched
)

// writeArgs are writeScript's keys and arguments for one account's write.
type writeArgs struct {
	hash, claim string // the account's hash and claim marker (KEYS)
	keyTTLMs    int64  // how long the hash lives after the write (ms)
	skewMs      int64  // the clock skew (ms)
	mode        string // writeMerge, writeRelease or writeExisting
	// rec's tags are written as field/value pairs, and its negative
	// entry, if any, unless mode is writeExisting.
	rec *cache.Record
}

func (a writeArgs) keys() []string { return []string{a.hash, a.claim} }

// argv is in write.lua's order: key_ttl_ms, skew, neg, mode, then the
// field/value pairs.
func (a writeArgs) argv() []any {
	args := make([]any, 4, 4+2*len(a.rec.Tags))
	args[0], args[1], args[2], args[3] = a.keyTTLMs, a.skewMs, "", a.mode
	if a.rec.NotFoundCode != 0 && a.mode != writeExisting {
		args[2] = string(encodeNeg(nil, a.rec))
	}
	var buf []byte
	for _, v := range a.rec.Tags {
		buf = encodeTag(buf[:0], v)
		args = append(args, fieldOf(v.Tag), string(buf))
	}
	return args
}

// queueWrite adds account's versioned write to pipe (see writeScript):
// by the script's hash, or with its text when load is set.
func (r *Tier) queueWrite(ctx context.Context, pipe redis.Pipeliner, account string, rec *cache.Record, mode string, load bool) {
	a := writeArgs{hash: r.Key(account), claim: r.claimKey(account), keyTTLMs: r.keyTTL.Milliseconds(), skewMs: r.skew,
		mode: mode, rec: rec}
	if load {
		writeScript.Eval(ctx, pipe, a.keys(), a.argv()...)
	} else {
		writeScript.EvalSha(ctx, pipe, a.keys(), a.argv()...)
	}
}
