package cache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// nickLoader is a Loader that answers every account's Tag_Profile_IM_Nick
// with "nick-<account>" and counts its loads. It admits every request.
type nickLoader struct{ loads int }

func (*nickLoader) Admit(int, time.Time, bool) (cache.Ticket, error) { return nil, nil }
func (*nickLoader) Promote(string)                                   {}

func (l *nickLoader) Load(_ context.Context, lk cache.Lookup) (cache.Fetched, error) {
	l.loads++ // one lookup at a time in this example; a real Loader is used concurrently
	it := im.UserProfile{ToAccount: lk.Account}
	for _, tag := range lk.Tags {
		v, _ := json.Marshal("nick-" + lk.Account)
		it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: tag, Value: v})
	}
	return cache.Fetched{Item: it, Tags: lk.Tags}, nil
}

// The first lookup of an account is loaded; the second, within the TTL, is
// answered from the in-process tier without calling the Loader.
func ExampleCache_Get() {
	loader := &nickLoader{}
	c, err := cache.New(cache.Config{Loader: loader, TTL: time.Minute})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	tags := []string{"Tag_Profile_IM_Nick"}
	for range 2 {
		a := c.Get(context.Background(), []string{"alice"}, tags)[0]
		p := a.Item.ProfileItem[0]
		fmt.Printf("%s %s=%s from %s, loads so far: %d\n", a.Item.ToAccount, p.Tag, p.Value, a.Source, loader.loads)
	}
	// Output:
	// alice Tag_Profile_IM_Nick="nick-alice" from upstream, loads so far: 1
	// alice Tag_Profile_IM_Nick="nick-alice" from local, loads so far: 1
}

// A caller answers hits into buffers it keeps and reuses, and falls back to
// Get when some account is not in the in-process tier (Hits then counted
// nothing, so Get counts each account once).
func ExampleCache_Hits() {
	c, err := cache.New(cache.Config{Loader: &nickLoader{}, TTL: time.Minute})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	var answers []cache.Answer // the caller's buffers, reused call after call
	var items []im.ProfileItem
	tags := []string{"Tag_Profile_IM_Nick"}
	for range 2 {
		var ok bool
		answers, items, ok = c.Hits(answers[:0], items[:0], []string{"alice"}, tags)
		if !ok {
			answers = c.Get(context.Background(), []string{"alice"}, tags)
		}
		// answers are valid until the buffers are passed to Hits again.
		for _, a := range answers {
			fmt.Printf("%s=%s from %s (hits: %v)\n", a.Item.ToAccount, a.Item.ProfileItem[0].Value, a.Source, ok)
		}
	}
	// Output:
	// alice="nick-alice" from upstream (hits: false)
	// alice="nick-alice" from local (hits: true)
}
