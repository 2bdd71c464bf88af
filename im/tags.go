package im

import (
	"slices"
	"strings"
)

// StandardTags are the standard profile tags, in the documented order.
var StandardTags = []string{
	"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_BirthDay", "Tag_Profile_IM_Location",
	"Tag_Profile_IM_SelfSignature", "Tag_Profile_IM_AllowType", "Tag_Profile_IM_Language", "Tag_Profile_IM_Image",
	"Tag_Profile_IM_MsgSettings", "Tag_Profile_IM_AdminForbidType", "Tag_Profile_IM_Level", "Tag_Profile_IM_Role",
}

var standardSet = func() map[string]bool {
	m := make(map[string]bool, len(StandardTags))
	for _, t := range StandardTags {
		m[t] = true
	}
	return m
}()

// IsStandardTag reports whether tag is one of StandardTags.
func IsStandardTag(tag string) bool { return standardSet[tag] }

// ValidTag reports whether tag is a standard tag or a well-formed custom
// tag (Tag_Profile_Custom_ followed by 1–8 English letters).
func ValidTag(tag string) bool {
	if standardSet[tag] {
		return true
	}
	rest, ok := strings.CutPrefix(tag, "Tag_Profile_Custom_")
	if !ok || len(rest) < 1 || len(rest) > 8 {
		return false
	}
	for i := 0; i < len(rest); i++ {
		if c := rest[i]; !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// MaxTagsPerCall is the longest TagList the proxy accepts from a caller and
// sends upstream. The upstream's own limit is not documented; an app has the
// dozen standard tags and a few dozen custom ones at most, so 64 entries
// cover every meaningful list, and a longer one is refused with 40001 (the
// emulator plays the same limit).
const MaxTagsPerCall = 64

// DedupTags returns tags with repeats removed, the first occurrence of each
// kept in place (the upstream answers each tag once). It returns tags itself
// when nothing repeats.
func DedupTags(tags []string) []string {
	for i := 1; i < len(tags); i++ {
		if slices.Contains(tags[:i], tags[i]) {
			out := slices.Clone(tags[:i])
			for _, t := range tags[i+1:] {
				if !slices.Contains(out, t) {
					out = append(out, t)
				}
			}
			return out
		}
	}
	return tags
}

// TagClass is the class of a profile tag: standard or custom. The upstream
// answers 40807 when an account holds no standard data and 40809 when it
// holds no custom data.
type TagClass uint8

// Tag classes.
const (
	ClassStandard TagClass = 1 << iota
	ClassCustom
)

// ClassOf returns tag's class: ClassStandard for a standard tag, ClassCustom
// otherwise.
func ClassOf(tag string) TagClass {
	if standardSet[tag] {
		return ClassStandard
	}
	return ClassCustom
}

// ClassesOf returns the union of the classes of tags.
func ClassesOf(tags []string) TagClass {
	var c TagClass
	for _, t := range tags {
		c |= ClassOf(t)
	}
	return c
}

// NoDataClass returns the tag class a "no data of this class" code speaks
// of (40807: standard, 40809: custom), or 0 for any other code.
func NoDataClass(code int) TagClass {
	switch code {
	case CodeNoStdData:
		return ClassStandard
	case CodeNoCustomData:
		return ClassCustom
	}
	return 0
}
