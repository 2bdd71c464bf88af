package cache

import (
	"encoding/json"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// TagValue is one cached account+tag. Set is false for a tag the upstream
// was asked for and did not return (an unset tag): it is cached as unset,
// so it is not fetched again and again.
type TagValue struct {
	Tag   string
	Value json.RawMessage
	Set   bool
	Fresh time.Time // served without a refresh until then
	Stale time.Time // servable while refreshing or when the upstream fails, until then
}

// Record is what a tier holds for one account. Records are immutable once
// stored: writers build a new one (see merge). Tags is a short slice, one
// entry per tag (at most a dozen or so): a map would cost a whole bucket
// group per account, five times the memory, for no faster lookup.
type Record struct {
	// NotFoundCode, when non-zero, is the upstream's answer that the
	// account does not exist (or has no data), remembered until NotFoundUntil.
	NotFoundCode  int
	NotFoundInfo  string
	NotFoundUntil time.Time
	Tags          []TagValue
}

// Tag returns the record's entry for tag.
func (r *Record) Tag(tag string) (TagValue, bool) {
	for _, v := range r.Tags {
		if v.Tag == tag {
			return v, true
		}
	}
	return TagValue{}, false
}

// put sets v, replacing the entry for the same tag. Only for records not
// yet stored.
func (r *Record) put(v TagValue) {
	for i := range r.Tags {
		if r.Tags[i].Tag == v.Tag {
			r.Tags[i] = v
			return
		}
	}
	r.Tags = append(r.Tags, v)
}

// intern returns the canonical string for a standard tag, so records do
// not each keep their own copy of a request's tag names.
func intern(tag string) string {
	if c, ok := internedTags[tag]; ok {
		return c
	}
	return strings.Clone(tag)
}

var internedTags = func() map[string]string {
	m := map[string]string{}
	for _, t := range upstream.StandardTags {
		m[t] = t
	}
	return m
}()

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
		v, ok := r.Tag(t)
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
	out := &Record{Tags: make([]TagValue, len(old.Tags), len(old.Tags)+len(upd.Tags))}
	if upd.NotFoundCode != 0 {
		out.NotFoundCode, out.NotFoundInfo, out.NotFoundUntil = upd.NotFoundCode, upd.NotFoundInfo, upd.NotFoundUntil
	}
	copy(out.Tags, old.Tags)
	for _, v := range upd.Tags {
		out.put(v)
	}
	return out
}
