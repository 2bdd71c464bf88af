package proxy

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Attempt 1 is applied upstream but answered after the client gave up;
// attempts 2 and 3 are throttled. The caller gets the throttling code, and
// the error says the set may have been applied (so the cache drops the
// tags instead of serving the old value).
func TestSetterUnknownThenThrottledMaybeApplied(t *testing.T) {
	var calls atomic.Int32
	release := make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			select { // applied, but the answer comes too late
			case <-release:
			case <-r.Context().Done():
			}
			w.Write([]byte(`{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}`))
			return
		}
		w.Write([]byte(`{"ActionStatus":"FAIL","ErrorCode":60007,"ErrorInfo":"throttled"}`))
	}))
	defer up.Close()
	defer close(release)
	client, err := upstream.New(upstream.Config{BaseURL: up.URL, Timeout: 100 * time.Millisecond,
		Signer: usersig.NewSigner("k", 1400000000, "administrator", 0, nil)})
	if err != nil {
		t.Fatal(err)
	}
	lim, err := limiter.NewLocal(limiter.Config{Rate: 100})
	if err != nil {
		t.Fatal(err)
	}
	s := &setter{lim: lim, client: client, backoff: 10 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = s.PortraitSet(ctx, im.SetRequest{FromAccount: "u1", ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: []byte(`"x"`)}}})
	var ue *upstream.Error
	if calls.Load() != 3 || !errors.As(err, &ue) || ue.Code != im.CodeFreqLimit {
		t.Fatalf("%d calls, error %v; want 3 calls ending throttled", calls.Load(), err)
	}
	if !errors.Is(err, httpapi.ErrMaybeApplied) {
		t.Fatalf("error %v does not say the first attempt may have been applied", err)
	}
	// Throttled throughout: known not applied.
	calls.Store(1)
	err = s.PortraitSet(ctx, im.SetRequest{FromAccount: "u1", ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: []byte(`"x"`)}}})
	if errors.Is(err, httpapi.ErrMaybeApplied) || !errors.As(err, &ue) {
		t.Fatalf("throttled only: %v", err)
	}
}
