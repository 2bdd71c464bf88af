package httpapi

import "strings"

// MaxAccountIDBytes is the longest account id IM accepts.
const MaxAccountIDBytes = 32

// validAccount reports whether id is 1–32 bytes of printable ASCII.
func validAccount(id string) bool {
	if len(id) == 0 || len(id) > MaxAccountIDBytes {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

var standardTags = map[string]bool{
	"Tag_Profile_IM_Nick": true, "Tag_Profile_IM_Gender": true, "Tag_Profile_IM_BirthDay": true,
	"Tag_Profile_IM_Location": true, "Tag_Profile_IM_SelfSignature": true, "Tag_Profile_IM_AllowType": true,
	"Tag_Profile_IM_Language": true, "Tag_Profile_IM_Image": true, "Tag_Profile_IM_MsgSettings": true,
	"Tag_Profile_IM_AdminForbidType": true, "Tag_Profile_IM_Level": true, "Tag_Profile_IM_Role": true,
}

// ValidTag reports whether tag is a standard tag or a well-formed custom
// tag (Tag_Profile_Custom_ followed by 1–8 English letters).
func ValidTag(tag string) bool {
	if standardTags[tag] {
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
