package cache

import (
	"encoding/json"
	"time"
)

// TagValue is one cached account+tag. Set is false for a tag the upstream
// was asked for and did not return (an unset tag): it is cached as unset,
// so it is not fetched again and again.
type TagValue struct {
	Value json.RawMessage
	Set   bool
	Fresh time.Time // served without a refresh until then
	Stale time.Time // servable while refreshing or when the upstream fails, until then
}

// Record is what a tier holds for one account. Records are immutable once
// stored: writers build a new one (see merge).
type Record struct {
	// NotFoundCode, when non-zero, is the upstream's answer that the
	// account does not exist (or has no data), remembered until NotFoundUntil.
	NotFoundCode  int
	NotFoundInfo  string
	NotFoundUntil time.Time
	Tags          map[string]TagValue
}

// state is how well a record serves a set of tags at a time.
type state int

const (
	stateMiss     state = iota // some tag absent or past its stale time
	stateStale                 // every tag servable, some past fresh
	stateFresh                 // every tag fresh
	stateNotFound              // a live negative entry
)

func (r *Record) state(tags []string, now time.Time) state {
	if r == nil {
		return stateMiss
	}
	if r.NotFoundCode != 0 && now.Before(r.NotFoundUntil) {
		return stateNotFound
	}
	st := stateFresh
	for _, t := range tags {
		v, ok := r.Tags[t]
		switch {
		case !ok || !now.Before(v.Stale):
			return stateMiss
		case !now.Before(v.Fresh):
			st = stateStale
		}
	}
	return st
}

// merge returns a new record: old's tags overlaid with upd's, and upd's
// negative entry if it has one. A found record clears a negative one.
func merge(old, upd *Record) *Record {
	if old == nil {
		return upd
	}
	out := &Record{Tags: make(map[string]TagValue, len(old.Tags)+len(upd.Tags))}
	if upd.NotFoundCode != 0 {
		out.NotFoundCode, out.NotFoundInfo, out.NotFoundUntil = upd.NotFoundCode, upd.NotFoundInfo, upd.NotFoundUntil
	}
	for t, v := range old.Tags {
		out.Tags[t] = v
	}
	for t, v := range upd.Tags {
		out.Tags[t] = v
	}
	return out
}
