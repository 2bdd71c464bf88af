package imsim

import (
	"encoding/json"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// numericTags are the standard tags whose value is a number; the other
// standard tags (im.StandardTags) hold strings.
var numericTags = map[string]bool{
	"Tag_Profile_IM_BirthDay":    true,
	"Tag_Profile_IM_Language":    true,
	"Tag_Profile_IM_MsgSettings": true,
	"Tag_Profile_IM_Level":       true,
	"Tag_Profile_IM_Role":        true,
}

// DefaultCustomTags are the custom tags configured in the emulated app
// unless Behaviour.CustomTags says otherwise.
var DefaultCustomTags = []string{"Tag_Profile_Custom_Test", "Tag_Profile_Custom_Team", "Tag_Profile_Custom_Bio"}

// CustomTags is DefaultCustomTags under its former name.
var CustomTags = DefaultCustomTags

func (b *Behaviour) knownTag(tag string) bool {
	return im.IsStandardTag(tag) || slices.Contains(b.CustomTags, tag)
}

// AccountName returns the id of the i-th seeded account.
func AccountName(i int) string { return "user" + strconv.Itoa(i) }

// seededIndex returns i for an account named AccountName(i), or -1.
func seededIndex(account string) int {
	rest, ok := strings.CutPrefix(account, "user")
	if !ok || rest == "" || (len(rest) > 1 && rest[0] == '0') {
		return -1
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 {
		return -1
	}
	return n
}

func hash(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

func jsonString(s string) json.RawMessage {
	b, _ := json.Marshal(s)
	return b
}

func jsonUint(n uint64) json.RawMessage { return json.RawMessage(strconv.FormatUint(n, 10)) }

// SeededValue returns the generated value of tag for a seeded account, and
// false where the account leaves that tag unset. Every seeded account whose
// hash is divisible by 5 leaves SelfSignature, Location and the custom tags
// unset, so both behaviours for unset tags can be exercised.
func SeededValue(account, tag string) (json.RawMessage, bool) {
	h := hash(account)
	sparse := h%5 == 0
	switch tag {
	case "Tag_Profile_IM_Nick":
		return jsonString("nick-" + account), true
	case "Tag_Profile_IM_Gender":
		return jsonString([]string{"Gender_Type_Unknown", "Gender_Type_Female", "Gender_Type_Male"}[h%3]), true
	case "Tag_Profile_IM_BirthDay":
		return jsonUint(19700101 + h%500000), true
	case "Tag_Profile_IM_Location":
		if sparse {
			return nil, false
		}
		return jsonString("loc-" + strconv.FormatUint(h%1000, 10)), true
	case "Tag_Profile_IM_SelfSignature":
		if sparse {
			return nil, false
		}
		return jsonString("I'm " + account), true
	case "Tag_Profile_IM_AllowType":
		return jsonString([]string{"AllowType_Type_NeedConfirm", "AllowType_Type_AllowAny", "AllowType_Type_DenyAny"}[h%3]), true
	case "Tag_Profile_IM_Language":
		return jsonUint(h % 10), true
	case "Tag_Profile_IM_Image":
		return jsonString("https://img.example.com/" + account + ".png"), true
	case "Tag_Profile_IM_MsgSettings":
		return jsonUint(h % 2), true
	case "Tag_Profile_IM_AdminForbidType":
		return jsonString("AdminForbid_Type_None"), true
	case "Tag_Profile_IM_Level":
		return jsonUint(h % 100), true
	case "Tag_Profile_IM_Role":
		return jsonUint(h % 4), true
	case "Tag_Profile_Custom_Test":
		if sparse {
			return nil, false
		}
		return jsonString("custom-" + account), true
	case "Tag_Profile_Custom_Team":
		if sparse {
			return nil, false
		}
		return jsonString("team-" + strconv.FormatUint(h%50, 10)), true
	}
	return nil, false // Tag_Profile_Custom_Bio: unset until portrait_set
}

// Sparse reports whether a seeded account leaves some tags unset.
func Sparse(account string) bool { return hash(account)%5 == 0 }
