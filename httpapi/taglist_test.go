package httpapi

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// tagLookup wraps fakeLookup, recording the tags each Get was asked for.
type tagLookup struct {
	fakeLookup
	tmu  sync.Mutex
	tags [][]string
}

func (l *tagLookup) Get(ctx context.Context, accounts, tags []string) []cache.Answer {
	l.tmu.Lock()
	l.tags = append(l.tags, slices.Clone(tags))
	l.tmu.Unlock()
	return l.fakeLookup.Get(ctx, accounts, tags)
}

// TestTagListBounded is the attack of a caller repeating tags: a TagList
// longer than the upstream accepts is refused with 40001 before any lookup,
// and repeats are answered once (the answer does not grow with them).
func TestTagListBounded(t *testing.T) {
	repeat := func(tag string, n int) string {
		return `"` + strings.Repeat(tag+`","`, n-1) + tag + `"`
	}
	t.Run("too long", func(t *testing.T) {
		for _, n := range []int{im.MaxTagsPerCall + 1, 40_000} {
			l := &tagLookup{}
			h := newHandler(t, l, AuthUserSig)
			_, out, raw := do(t, h, http.MethodPost, query(), `{"To_Account":["u1"],"TagList":[`+repeat("Tag_Profile_IM_Nick", n)+`]}`)
			if out.ErrorCode != im.CodeBadRequest || out.ActionStatus != "FAIL" || !strings.Contains(out.ErrorInfo, "TagList") {
				t.Fatalf("%d tags: %s", n, raw)
			}
			if len(l.calls) != 0 {
				t.Fatalf("%d tags reached the lookup", n)
			}
		}
	})
	t.Run("repeats answered once", func(t *testing.T) {
		l := &tagLookup{}
		h := newHandler(t, l, AuthUserSig)
		body := `{"To_Account":["u1","u1"],"TagList":[` + repeat("Tag_Profile_IM_Nick", 30) + `,"Tag_Profile_Custom_Test",` +
			repeat("Tag_Profile_IM_Nick", 30) + `,"Tag_Profile_Custom_Test"]}`
		_, out, raw := do(t, h, http.MethodPost, query(), body)
		if out.ErrorCode != 0 || len(out.UserProfileItem) != 2 {
			t.Fatalf("answer %s", raw)
		}
		want := []string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Test"}
		if len(l.tags) != 1 || !slices.Equal(l.tags[0], want) {
			t.Fatalf("lookup asked for %v, want %v", l.tags, want)
		}
		for _, it := range out.UserProfileItem {
			if it.ToAccount != "u1" || len(it.ProfileItem) != 2 {
				t.Fatalf("item %+v: each tag once, each mention of the account answered", it)
			}
		}
	})
	t.Run("exactly the limit", func(t *testing.T) {
		l := &tagLookup{}
		h := newHandler(t, l, AuthUserSig)
		_, out, raw := do(t, h, http.MethodPost, query(), `{"To_Account":["u1"],"TagList":[`+repeat("Tag_Profile_IM_Nick", im.MaxTagsPerCall)+`]}`)
		if out.ErrorCode != 0 || len(out.UserProfileItem[0].ProfileItem) != 1 {
			t.Fatalf("answer %s", raw)
		}
	})
}

func TestDedupTags(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"a"}, []string{"a"}},
		{[]string{"a", "b"}, []string{"a", "b"}},
		{[]string{"a", "a", "b", "a", "c", "b"}, []string{"a", "b", "c"}},
		{[]string{"b", "a", "b"}, []string{"b", "a"}},
	} {
		if got := im.DedupTags(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("DedupTags(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

type refusedTags map[string]int

func (r refusedTags) Check(tags []string) (int, string, bool) {
	for _, t := range tags {
		if c, ok := r[t]; ok {
			return c, "tag does not exist: " + t, true
		}
	}
	return 0, "", false
}

// TestRefusedTagAnsweredAtOnce: a request naming a tag known to be refused
// gets the upstream's code for the whole call and never reaches a lookup.
func TestRefusedTagAnsweredAtOnce(t *testing.T) {
	l := &tagLookup{}
	h, err := New(Config{Lookup: l, SDKAppID: app, Key: key, Tags: refusedTags{"Tag_Profile_Custom_Nope": 40009}})
	if err != nil {
		t.Fatal(err)
	}
	_, out, raw := do(t, h, http.MethodPost, query(), `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_Custom_Nope"]}`)
	if out.ErrorCode != 40009 || out.ActionStatus != "FAIL" || !strings.Contains(out.ErrorInfo, "Tag_Profile_Custom_Nope") {
		t.Fatalf("answer %s", raw)
	}
	_, out, raw = do(t, h, http.MethodPost, query(), `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`)
	if out.ErrorCode != 0 {
		t.Fatalf("answer %s", raw)
	}
	if len(l.calls) != 1 {
		t.Fatalf("lookups %v: the refused request must not reach one", l.calls)
	}
}
