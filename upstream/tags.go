package upstream

import "strings"

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
