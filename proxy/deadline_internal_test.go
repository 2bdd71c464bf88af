package proxy

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
)

type echoUpstream struct{}

func (echoUpstream) PortraitGet(_ context.Context, req im.GetRequest) (*im.GetResponse, error) {
	resp := &im.GetResponse{ActionStatus: im.StatusOK}
	for _, a := range req.ToAccount {
		it := im.UserProfile{ToAccount: a}
		for _, t := range req.TagList {
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: json.RawMessage(`"v"`)})
		}
		resp.UserProfileItem = append(resp.UserProfileItem, it)
	}
	return resp, nil
}

// TestFarDeadlineLookupServed: a lookup whose caller allows a long time
// (a deadline past 2262, e.g. -request-timeout 2500000h) is answered. Had
// the cache's flight carried the deadline to the batcher as Unix
// nanoseconds, it would overflow: the batcher would see a deadline in the
// past and drop the lookup with ErrWouldMiss.
func TestFarDeadlineLookupServed(t *testing.T) {
	lim, err := limiter.NewLocal(limiter.Config{Rate: 100})
	if err != nil {
		t.Fatal(err)
	}
	b, err := batcher.New(batcher.Config{Upstream: echoUpstream{}, Limiter: lim})
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); b.Run(ctx) }()
	defer func() { stop(); <-done }()
	c, err := cache.New(cache.Config{Loader: batchLoader{b}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	rctx, cancel := context.WithTimeout(context.Background(), 2500000*time.Hour)
	defer cancel()
	ans := c.Get(rctx, []string{"user1"}, []string{"Tag_Profile_IM_Nick"})
	if ans[0].Err != nil || len(ans[0].Item.ProfileItem) != 1 {
		t.Fatalf("lookup with a far deadline answered %+v", ans[0])
	}
}
