package cache

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"
)

// TestPickMemoPerTagList: the items a record keeps for the first tag list
// asked are given only for that list; any other list gets its own items,
// and the kept ones are never changed by the answers built after them.
func TestPickMemoPerTagList(t *testing.T) {
	now := time.Now()
	rec := newRecord(3)
	for _, tg := range []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_Custom_A"} {
		rec.Put(TagValue{Tag: tg, Value: json.RawMessage(`"` + tg + `"`), Set: true, Fresh: now.Add(time.Hour), Stale: now.Add(2 * time.Hour)})
	}
	show := func(tags ...string) string {
		it := pick("u", rec, tags, now)
		return fmt.Sprint(it.ProfileItem)
	}
	nick := show("Tag_Profile_IM_Nick")
	for _, tc := range []struct {
		tags []string
		want string
	}{
		{[]string{"Tag_Profile_IM_Level"}, `[{Tag_Profile_IM_Level [34 84 97 103 95 80 114 111 102 105 108 101 95 73 77 95 76 101 118 101 108 34]}]`},
		{[]string{"Tag_Profile_IM_Nick"}, nick},
		{[]string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_A"}, ""},
		{[]string{"Tag_Profile_IM_Nick"}, nick},
	} {
		got := show(tc.tags...)
		if tc.want != "" && got != tc.want {
			t.Errorf("pick %v = %s, want %s", tc.tags, got, tc.want)
		}
		if n := len(pick("u", rec, tc.tags, now).ProfileItem); n != len(tc.tags) {
			t.Errorf("pick %v: %d items", tc.tags, n)
		}
	}
	a, b := pick("u", rec, []string{"Tag_Profile_IM_Nick"}, now), pick("u", rec, []string{"Tag_Profile_IM_Nick"}, now)
	if cap(a.ProfileItem) != len(a.ProfileItem) {
		t.Fatal("shared items have spare capacity: an append by one answer would write into another's")
	}
	a.ProfileItem = append(a.ProfileItem, a.ProfileItem[0])
	if len(b.ProfileItem) != 1 || fmt.Sprint(b.ProfileItem) != nick {
		t.Fatalf("an answer's append changed another's items: %v", b.ProfileItem)
	}
}
