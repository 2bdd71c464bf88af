package cache

import (
	"context"
	"encoding/json"
	"testing"
	"time"
)

const nick = "Tag_Profile_IM_Nick"

func TestSupersedes(t *testing.T) {
	const skew = 1000
	fetch := func(ver int64) TagValue { return TagValue{Origin: FromFetch, Ver: ver} }
	set := func(ver int64) TagValue { return TagValue{Origin: FromSet, Ver: ver} }
	cb := func(event, ver int64) TagValue { return TagValue{Origin: FromCallback, Event: event, Ver: ver} }
	cases := []struct {
		name     string
		upd, old TagValue
		want     bool
	}{
		{"later fetch over fetch", fetch(10_000), fetch(9_000), true},
		{"same-time fetch over fetch", fetch(10_000), fetch(10_000), true},
		{"older fetch over fetch", fetch(9_000), fetch(10_000), false},
		{"fetch sent before a set", fetch(9_999), set(10_000), false},
		{"fetch sent just after a set (within skew)", fetch(10_500), set(10_000), false},
		{"fetch sent well after a set", fetch(11_000), set(10_000), true},
		{"fetch sent before a callback arrived", fetch(9_000), cb(8_000, 10_000), false},
		{"fetch sent well after a callback arrived", fetch(11_500), cb(8_000, 10_000), true},
		{"set over an older fetch", set(10_000), fetch(9_000), true},
		{"set over a newer fetch", set(9_000), fetch(10_000), false},
		{"set over a callback that arrived before", set(10_000), cb(9_000, 9_500), true},
		{"newer callback over callback", cb(200, 5), cb(100, 10_000), true},
		{"repeated callback", cb(100, 20_000), cb(100, 10_000), true},
		{"older callback over callback", cb(100, 20_000), cb(200, 10_000), false},
		{"callback over a fetch sent before it (by the clocks)", cb(10_000, 12_000), fetch(10_500), true},
		{"callback long before a fetch", cb(5_000, 12_000), fetch(10_000), false},
		{"callback older than the tag's newest event", cb(100, 12_000), TagValue{Origin: FromFetch, Ver: 0, Event: 200}, false},
		{"callback long before a set", cb(5_000, 12_000), set(10_000), false},
		{"repeat of a callback over a set that followed it", cb(10_000, 10_300), TagValue{Origin: FromSet, Ver: 10_200, Event: 10_000}, false},
		{"repeat of a callback over a fetch that followed it", cb(10_000, 10_300), TagValue{Origin: FromFetch, Ver: 10_100, Event: 10_000}, false},
		{"repeat of a callback over an invalidation", cb(10_000, 10_300), TagValue{Origin: FromInvalidate, Ver: 10_200, Event: 10_000}, false},
		{"newer callback over a set that followed the last one", cb(10_001, 10_300), TagValue{Origin: FromSet, Ver: 10_200, Event: 10_000}, true},
		{"invalidation over a set answered before it", TagValue{Origin: FromInvalidate, Ver: 10_500}, set(10_000), true},
		{"invalidation over a callback that arrived after it", TagValue{Origin: FromInvalidate, Ver: 10_500}, cb(9_000, 11_000), false},
		{"fetch sent just after an invalidation (within skew)", fetch(10_501), TagValue{Origin: FromInvalidate, Ver: 10_500}, false},
		{"fetch sent well after an invalidation", fetch(11_500), TagValue{Origin: FromInvalidate, Ver: 10_500}, true},
		{"fetch sent before an invalidation", fetch(10_499), TagValue{Origin: FromInvalidate, Ver: 10_500}, false},
	}
	for _, c := range cases {
		if got := supersedes(&c.upd, &c.old, skew); got != c.want {
			t.Errorf("%s: supersedes = %v, want %v", c.name, got, c.want)
		}
	}
}

// gate is a loader whose calls block until released; each call answers
// with the value current at release.
type gate struct {
	admitAll
	started chan struct{}
	release chan string
}

func (g *gate) Load(ctx context.Context, lk Lookup) (Fetched, error) {
	account, tags := lk.Account, lk.Tags
	sent := time.Now()
	g.started <- struct{}{}
	v := <-g.release
	return Fetched{Tags: tags, Sent: sent, Item: item(account, nick, v)}, nil
}

func nickOf(t *testing.T, c *Cache, account string) string {
	t.Helper()
	a := c.Get(context.Background(), []string{account}, []string{nick})[0]
	if a.Err != nil || len(a.Item.ProfileItem) != 1 {
		t.Fatalf("lookup of %s: %+v", account, a)
	}
	var s string
	json.Unmarshal(a.Item.ProfileItem[0].Value, &s)
	return s
}
