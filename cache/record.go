package cache

import (
	"bytes"
	"encoding/json"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// TagValue is one cached account+tag. Set is false for a tag the upstream
// was asked for and did not return (an unset tag): it is cached as unset,
// so it is not fetched again and again.
//
// Ver, Event and Origin order writes to the same tag, so a value never
// replaces a newer one (see supersedes): Ver is when the value was known
// to hold, on this proxy's clock in Unix milliseconds (a fetch's send
// time, a portrait_set's answer time, a callback's arrival time); Event is
// the upstream's EventTime of the newest change callback applied to the
// tag (kept across later fetches, so a late or repeated callback is
// recognised as old).
type TagValue struct {
	Tag    string
	Value  json.RawMessage
	Set    bool
	Origin Origin
	Ver    int64
	Event  int64
	Fresh  time.Time // served without a refresh until then
	Stale  time.Time // servable while refreshing or when the upstream fails, until then
}

// Origin is what wrote a cached value.
type Origin uint8

// Origins of a TagValue.
const (
	FromFetch      Origin = iota // a portrait_get answer
	FromSet                      // a successful portrait_set through this proxy
	FromCallback                 // the upstream's Profile.CallbackPortraitSet
	FromInvalidate               // a change whose value is unknown or untrusted: an unset, expired entry
)

// supersedes reports whether upd may replace old, both for the same tag.
// skew is how far (ms) the upstream's clock, and replicas' clocks, may be
// apart from this proxy's.
//
//   - A fetch sent at S replaces a fetched value sent no later than S, and a
//     changed value (set or callback) only when S-skew is past the change:
//     a fetch sent before a change can never overwrite it, however late
//     its answer arrives.
//   - A portrait_set answered at R replaces any value known as of R or
//     earlier.
//   - A callback with EventTime E replaces a callback's value when E is
//     not older than that one's EventTime (a repeat is harmless), and a
//     fetched, set or dropped value when E is newer than every EventTime
//     the tag has seen (so a repeat of a callback already applied never
//     undoes what was written after it) and the fetch or set was not sent
//     more than skew after E (then it already reflects the change).
//   - An invalidation at R (a change whose value is unknown or not
//     trusted) replaces any value known as of R or earlier, like a set; a
//     fetch replaces it only when sent more than skew after R, like a set
//     (R and the send time may be on two replicas' clocks).
func supersedes(upd, old *TagValue, skew int64) bool {
	switch upd.Origin {
	case FromFetch:
		if old.Origin == FromFetch {
			return upd.Ver >= old.Ver
		}
		return upd.Ver-skew >= old.Ver
	case FromSet, FromInvalidate:
		return upd.Ver >= old.Ver
	default:
		if old.Origin == FromCallback {
			return upd.Event >= old.Event
		}
		return upd.Event > old.Event && upd.Event+skew > old.Ver
	}
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
	NotFoundVer   int64 // send time (ms) of the fetch that found no account
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
	for _, t := range im.StandardTags {
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
	var std, custom bool // a "no data" marker of the class applies (see nodata.go)
	if r.hasMarker() {
		_, std = r.noData(im.ClassStandard, now)
		_, custom = r.noData(im.ClassCustom, now)
	}
	covered := false
	for _, t := range tags {
		if std && im.IsStandardTag(t) || custom && !im.IsStandardTag(t) {
			covered = true
			continue
		}
		v, ok := r.Tag(t)
		switch {
		case !ok || !now.Before(v.Stale):
			return stateMiss
		case !now.Before(v.Fresh):
			st = stateStale
		}
	}
	if covered {
		return stateNotFound // answered by the marker (pick)
	}
	return st
}

// hasMarker reports whether r holds a "no data" marker (nodata.go).
func (r *Record) hasMarker() bool {
	for i := range r.Tags {
		if isMarker(r.Tags[i].Tag) {
			return true
		}
	}
	return false
}

// merge returns a new record: old's tags overlaid with those of upd's that
// supersede them, and upd's negative entry if no tag of old is newer. A
// tag that is written clears old's negative entry (the account exists),
// except one known as of a time before that entry's version (see
// changedAt): the account was known not to exist after it (a late fetch
// answer, a change callback or a portrait_set from before an
// account_delete cannot bring the account back). An invalidation (an
// import) always clears it. A negative entry that
// is stored drops old's tags: all of them are older, and none may be
// served once the entry has expired (a deleted account's profile). When
// nothing of upd applies, merge returns old itself.
func merge(old, upd *Record, skew int64) *Record {
	if old == nil {
		return upd
	}
	var out *Record
	clone := func() {
		if out == nil {
			out = &Record{NotFoundCode: old.NotFoundCode, NotFoundInfo: old.NotFoundInfo, NotFoundUntil: old.NotFoundUntil,
				NotFoundVer: old.NotFoundVer, Tags: make([]TagValue, len(old.Tags), len(old.Tags)+len(upd.Tags))}
			copy(out.Tags, old.Tags)
		}
	}
	var wrote []TagValue // values (not class entries) stored
	for i := range upd.Tags {
		v := upd.Tags[i]
		if v.Origin != FromInvalidate && old.NotFoundCode != 0 && v.changedAt() < old.NotFoundVer {
			continue
		}
		if isMarker(v.Tag) && !old.entryFits(&v, skew) {
			continue
		}
		if o, ok := old.Tag(v.Tag); ok {
			if !supersedes(&v, &o, skew) {
				continue
			}
			if v.Origin == FromCallback && o.Origin == FromCallback && v.Event == o.Event && v.Set == o.Set && bytes.Equal(v.Value, o.Value) {
				continue // the same callback again: nothing changes
			}
			if v.Origin != FromCallback {
				v.Event = max(v.Event, o.Event)
			}
		}
		clone()
		out.put(v)
		out.NotFoundCode, out.NotFoundInfo, out.NotFoundUntil, out.NotFoundVer = 0, "", time.Time{}, 0
		if !isMarker(v.Tag) {
			wrote = append(wrote, v)
		}
	}
	if len(wrote) > 0 {
		out.clearEntries(wrote, skew)
	}
	if upd.NotFoundCode != 0 && upd.NotFoundVer >= old.NotFoundVer {
		neg := TagValue{Origin: FromFetch, Ver: upd.NotFoundVer}
		for i := range old.Tags {
			if !supersedes(&neg, &old.Tags[i], skew) {
				return orOld(out, old)
			}
		}
		clone()
		out.NotFoundCode, out.NotFoundInfo, out.NotFoundUntil, out.NotFoundVer = upd.NotFoundCode, upd.NotFoundInfo, upd.NotFoundUntil, upd.NotFoundVer
		out.Tags = out.Tags[:0]
	}
	return orOld(out, old)
}

// changedAt is when v was known to hold, as compared with a negative
// entry's version: the upstream's EventTime for a callback, Ver otherwise.
func (v *TagValue) changedAt() int64 {
	if v.Origin == FromCallback {
		return v.Event
	}
	return v.Ver
}

func orOld(out, old *Record) *Record {
	if out == nil {
		return old
	}
	return out
}
