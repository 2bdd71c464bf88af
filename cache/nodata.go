package cache

import (
	"encoding/json"
	"slices"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// "No data of this class" (issue 14). The upstream answers 40807 for an
// account that holds no standard profile data and 40809 for one that holds
// no custom data. That is a fact about one tag class of an account, not
// about the account: it is cached as a marker entry next to the account's
// tags — "!s" for standard, "!c" for custom — and never as the
// account-wide negative entry (which only "no such account", 40003, is).
//
// A marker is a fetched, unset entry (every tier orders it against an
// older marker by the rules of supersedes): its Ver is the fetch's send
// time, its Fresh and Stale are when NegativeTTL ends, and its Value is the
// upstream's ResultInfo as a JSON string. As for the account-wide negative
// entry, merge and the Redis write script keep it true: a marker is stored
// only if it supersedes every value of its class held (a fetch sent within
// the clock skew of a set or callback does not hide it), and a value of
// its class that is written (a fetch, portrait_set, callback or
// invalidation) removes it unless the marker supersedes that value. It
// answers a tag of its class while it is live and no value of that class
// in the record is newer than it. Tags of the other class are never
// affected.

// Marker entries of the two classes: the tag names under which records
// hold them (a shared tier stores them as fields of these names).
const (
	MarkerStandard = "!s"
	MarkerCustom   = "!c"
)

func isMarker(tag string) bool { return tag == MarkerStandard || tag == MarkerCustom }

func markerOf(cls im.TagClass) string {
	if cls == im.ClassStandard {
		return MarkerStandard
	}
	return MarkerCustom
}

func classCode(cls im.TagClass) int {
	if cls == im.ClassStandard {
		return im.CodeNoStdData
	}
	return im.CodeNoCustomData
}

// ReadTags is what a tier reads for tags: tags and the markers of their
// classes.
func ReadTags(tags []string) []string {
	cls := im.ClassesOf(tags)
	out := make([]string, len(tags), len(tags)+2)
	copy(out, tags)
	if cls&im.ClassStandard != 0 {
		out = append(out, MarkerStandard)
	}
	if cls&im.ClassCustom != 0 {
		out = append(out, MarkerCustom)
	}
	return out
}

// noDataRecord is the record of a fetch sent at ver answered "no data of
// class cls" (code, info).
func noDataRecord(cls im.TagClass, info string, ver int64, until time.Time) *Record {
	v, _ := json.Marshal(info)
	return &Record{Tags: []TagValue{{Tag: markerOf(cls), Value: v, Origin: FromFetch, Ver: ver, Fresh: until, Stale: until}}}
}

// entryFits reports whether the class entry m may be stored over r: only
// if it supersedes every value of its class that r holds (a fetch sent
// within the clock skew of a set or callback of the class is not proof
// that the account holds no data of it).
func (r *Record) entryFits(m *TagValue, skew int64) bool {
	cls := classOfEntry(m.Tag)
	for i := range r.Tags {
		if v := &r.Tags[i]; !isMarker(v.Tag) && im.ClassOf(v.Tag) == cls && !supersedes(m, v, skew) {
			return false
		}
	}
	return true
}

// clearEntries removes from r (not yet stored) the class entries that do
// not supersede a value of their class just written to it: a written value
// of a class means the account holds data of it (as a written tag clears
// the account-wide negative entry).
func (r *Record) clearEntries(wrote []TagValue, skew int64) {
	for _, cls := range []im.TagClass{im.ClassStandard, im.ClassCustom} {
		m, ok := r.Tag(markerOf(cls))
		if !ok {
			continue
		}
		for i := range wrote {
			if im.ClassOf(wrote[i].Tag) == cls && !supersedes(&m, &wrote[i], skew) {
				r.Tags = slices.DeleteFunc(r.Tags, func(x TagValue) bool { return x.Tag == m.Tag })
				break
			}
		}
	}
}

func classOfEntry(tag string) im.TagClass {
	if tag == MarkerStandard {
		return im.ClassStandard
	}
	return im.ClassCustom
}

// noData returns the live marker of class cls that applies to r, if any.
func (r *Record) noData(cls im.TagClass, now time.Time) (TagValue, bool) {
	m, ok := r.Tag(markerOf(cls))
	if !ok || !now.Before(m.Stale) {
		return TagValue{}, false
	}
	for _, v := range r.Tags {
		if !isMarker(v.Tag) && im.ClassOf(v.Tag) == cls && v.Ver > m.Ver {
			return TagValue{}, false
		}
	}
	return m, true
}

// noDataItem returns the item answering tags when a live marker covers one
// of them: 40807 if a standard tag is covered (the upstream checks standard
// data first), else 40809.
func (r *Record) noDataItem(account string, tags []string, now time.Time) (im.UserProfile, bool) {
	if r == nil {
		return im.UserProfile{}, false
	}
	asked := im.ClassesOf(tags)
	for _, cls := range []im.TagClass{im.ClassStandard, im.ClassCustom} {
		if asked&cls == 0 {
			continue
		}
		if m, ok := r.noData(cls, now); ok {
			var info string
			json.Unmarshal(m.Value, &info)
			return im.UserProfile{ToAccount: account, ProfileItem: []im.ProfileItem{},
				ResultCode: classCode(cls), ResultInfo: info}, true
		}
	}
	return im.UserProfile{}, false
}
