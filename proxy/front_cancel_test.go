package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// TestCallerLeavingDropsItsLookup: a lookup waiting for the quota whose
// caller goes away is dropped before the next call, through the front as
// through net/http, so the quota is not spent on callers who left.
func TestCallerLeavingDropsItsLookup(t *testing.T) {
	for _, netHTTP := range []bool{false, true} {
		t.Run(map[bool]string{false: "front", true: "net/http"}[netHTTP], func(t *testing.T) {
			// One call every two seconds: the second lookup waits.
			r := start(t, imsim.Config{}, proxy.Config{Rate: 0.5, RequestTimeout: 10 * time.Second, NetHTTPOnly: netHTTP})
			r.get(t, []string{"user1"}, "Tag_Profile_IM_Nick")
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			if _, err := r.try(ctx, []string{"user42"}, "Tag_Profile_IM_Nick"); err == nil {
				t.Fatal("answered within 300 ms at one call every 2 s")
			}
			// The next call's batch is formed after the caller left.
			r.get(t, []string{"user43"}, "Tag_Profile_IM_Nick")
			if n, m := r.sim.FetchCount("user42"), r.sim.FetchCount("user43"); n != 0 || m != 1 {
				t.Fatalf("fetched: user42 (its caller left) %d times, user43 %d", n, m)
			}
		})
	}
}
