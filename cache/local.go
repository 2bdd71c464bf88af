package cache

import (
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

const localShards = 64

// Local is the in-process tier: a sharded map of records, bounded by a
// number of accounts. When a shard is full, inserting evicts the least
// recently used of a few sampled records (Redis's approximated LRU), which
// costs no list maintenance on the hit path. Local is safe for concurrent
// use; the zero value is not usable, use NewLocal.
type Local struct {
	seed     maphash.Seed
	perShard int
	skew     atomic.Int64 // ms; see supersedes
	shards   [localShards]localShard
}

type localShard struct {
	mu sync.RWMutex
	m  map[string]*localEntry
}

type localEntry struct {
	rec  atomic.Pointer[Record]
	used atomic.Int64 // unix nanoseconds of the last Get
}

// NewLocal returns a tier holding about maxAccounts records (at least one
// per shard). maxAccounts 0 means DefaultLocalAccounts; negative means a tier that
// holds nothing (every lookup goes to the next tier; for measuring it).
func NewLocal(maxAccounts int) *Local {
	if maxAccounts < 0 {
		return &Local{}
	}
	if maxAccounts == 0 {
		maxAccounts = DefaultLocalAccounts
	}
	l := &Local{seed: maphash.MakeSeed(), perShard: max(1, maxAccounts/localShards)}
	for i := range l.shards {
		l.shards[i].m = map[string]*localEntry{}
	}
	return l
}

func (l *Local) shard(account string) *localShard {
	return &l.shards[maphash.String(l.seed, account)%localShards]
}

// Get returns account's record, or nil.
func (l *Local) Get(account string, now time.Time) *Record {
	if l.perShard == 0 {
		return nil
	}
	s := l.shard(account)
	s.mu.RLock()
	e := s.m[account]
	s.mu.RUnlock()
	if e == nil {
		return nil
	}
	if n := now.UnixNano(); e.used.Load() < n-int64(time.Millisecond) {
		e.used.Store(n) // coarse: avoids a shared-cache-line write on every hit
	}
	return e.rec.Load()
}

// Merge stores merge(old, upd) for account, evicting another account when
// the shard is full. It reports whether anything of upd was stored (false
// when every part of it was older than what is held).
func (l *Local) Merge(account string, upd *Record, now time.Time) bool {
	_, applied := l.MergeHeld(account, upd, now)
	return applied
}

// MergeHeld is Merge that also returns the record account now has: the
// merged one, or upd itself when the tier holds nothing.
func (l *Local) MergeHeld(account string, upd *Record, now time.Time) (*Record, bool) {
	if l.perShard == 0 {
		return upd, false
	}
	s := l.shard(account)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.m[account]; e != nil {
		old := e.rec.Load()
		rec := merge(old, upd, l.skew.Load())
		e.rec.Store(rec)
		return rec, rec != old
	}
	if len(s.m) >= l.perShard {
		s.evictOne()
	}
	e := &localEntry{}
	e.rec.Store(upd)
	e.used.Store(now.UnixNano())
	s.m[account] = e
	return upd, true
}

// MergeExisting is Merge limited to what account's record already holds:
// tags of upd that the record lacks are left out, and an account without a
// record is left alone; a tombstone in upd drops a cached "not found". It never creates an entry (for changes nothing
// authenticates, and for tombstones, which need no entry to drop).
func (l *Local) MergeExisting(account string, upd *Record, now time.Time) bool {
	if l.perShard == 0 {
		return false
	}
	s := l.shard(account)
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.m[account]
	if e == nil {
		return false
	}
	old := e.rec.Load()
	held := &Record{Tags: make([]TagValue, 0, len(upd.Tags))}
	for _, v := range upd.Tags {
		// A tombstone drops a cached "not found" too, as in merge (an
		// account import announced by another replica): it only removes
		// what is cached, and the entry exists already.
		dropsNotFound := old.NotFoundCode != 0 && v.Origin == FromInvalidate
		if _, ok := old.Tag(v.Tag); ok || dropsNotFound {
			held.Tags = append(held.Tags, v)
		}
	}
	if len(held.Tags) == 0 {
		return false
	}
	rec := merge(old, held, l.skew.Load())
	e.rec.Store(rec)
	return rec != old
}

// Enabled reports whether the tier holds anything at all.
func (l *Local) Enabled() bool { return l.perShard > 0 }

// Delete removes account's record.
func (l *Local) Delete(account string) {
	if l.perShard == 0 {
		return
	}
	s := l.shard(account)
	s.mu.Lock()
	delete(s.m, account)
	s.mu.Unlock()
}

// Clear drops every record (the change feed was interrupted, so any of
// them may be older than a change this replica did not hear of).
func (l *Local) Clear() {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		clear(s.m)
		s.mu.Unlock()
	}
}

// Len returns the number of records held.
func (l *Local) Len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.RLock()
		n += len(s.m)
		s.mu.RUnlock()
	}
	return n
}

// evictOne drops the least recently used of up to five records; map
// iteration order is random, so they are a random sample.
func (s *localShard) evictOne() {
	var victim string
	oldest := int64(1<<63 - 1)
	n := 0
	for k, e := range s.m {
		if u := e.used.Load(); u < oldest {
			victim, oldest = k, u
		}
		if n++; n == 5 {
			break
		}
	}
	delete(s.m, victim)
}
