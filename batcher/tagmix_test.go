package batcher

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"testing/synctest"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// TestRandomTagSubsetsFillCalls: 1,000 lookups, each for a random subset
// of four tags, queued while no grant is free, leave in 10 calls of 100
// (calls form by arrival, not by tag set), each fetching the union of its
// callers' tags; every caller gets a value for each tag it asked for.
func TestRandomTagSubsetsFillCalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		four := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Image", "Tag_Profile_IM_AllowType"}
		g := newGate()
		h := start(t, Config{Upstream: &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) { return found(r), nil }},
			Limiter: g, MaxQueue: 5000})
		rnd := rand.New(rand.NewPCG(1, 2))
		type ask struct {
			account string
			tags    []string
			ch      chan loaded
		}
		var asks []ask
		for i := range 1000 {
			var tags []string
			for _, k := range rnd.Perm(4)[:1+rnd.IntN(4)] {
				tags = append(tags, four[k])
			}
			a := fmt.Sprintf("u%d", i)
			asks = append(asks, ask{a, tags, loadAsync(h.b, context.Background(), a, tags...)})
		}
		h.waitQueued(t, 1000)
		for range 10 {
			g.ch <- struct{}{}
		}
		for _, a := range asks {
			l := <-a.ch
			if l.err != nil || l.res.Item.ToAccount != a.account {
				t.Fatalf("%s: %+v, %v", a.account, l.res.Item, l.err)
			}
			for _, tag := range a.tags {
				if value(l.res, tag) != "v-"+a.account+"-"+tag || !slices.Contains(l.res.Tags, tag) {
					t.Fatalf("%s asked %v, got %+v (fetched %v)", a.account, a.tags, l.res.Item, l.res.Tags)
				}
			}
		}
		calls := h.up.Calls()
		if len(calls) != 10 {
			t.Fatalf("%d calls for 1,000 lookups, want 10", len(calls))
		}
		for _, c := range calls {
			if len(c.ToAccount) != 100 || len(c.TagList) != 4 {
				t.Fatalf("a call of %d accounts, tags %v", len(c.ToAccount), c.TagList)
			}
		}
	})
}
