//go:build !race

package httpapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// TestHitAllocations bounds what the handler allocates for a one-account
// lookup answered at once: the account's name and the call (its context
// and account list); the rest is pooled or shared. (The race detector
// makes sync.Pool drop items at random, hence the build tag.)
func TestHitAllocations(t *testing.T) {
	answers := []cache.Answer{{Item: im.UserProfile{ToAccount: "u1",
		ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"n"`)}}}}}
	h := newHandler(t, lookupFunc(func(ctx context.Context, accounts, tags []string) []cache.Answer { return answers }), AuthUserSig)
	body := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	rd := strings.NewReader(body)
	req := httptest.NewRequest(http.MethodPost, im.PathGet+"?"+query().Encode(), rd)
	hdr := http.Header{}
	w := &discardWriter{h: hdr}
	serve := func() {
		rd.Reset(body)
		clear(hdr)
		h.ServeHTTP(w, req)
		if w.code != 200 || w.n == 0 {
			t.Fatalf("answer %d", w.code)
		}
	}
	serve()
	if n := testing.AllocsPerRun(1000, serve); n > 2 {
		t.Fatalf("%.1f allocations per lookup, want at most 2", n)
	}
}

type discardWriter struct {
	h    http.Header
	code int
	n    int
}

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) WriteHeader(code int)        { w.code = code }
func (w *discardWriter) Write(p []byte) (int, error) { w.n = len(p); return len(p), nil }
