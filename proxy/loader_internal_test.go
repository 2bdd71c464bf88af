package proxy

import (
	"errors"
	"fmt"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/batcher"
	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// TestLoadErrorsReachCallers: the batcher's refusals cross the adapter as
// the cache's errors, so the HTTP layer (which knows only the cache) gives
// callers the same codes and words as when it matched the batcher's.
func TestLoadErrorsReachCallers(t *testing.T) {
	for _, tc := range []struct {
		err  error
		is   error
		code int
		info string
	}{
		{batcher.ErrOverloaded, cache.ErrOverloaded, im.CodeFreqLimit,
			"too many lookups for the app's upstream quota: overloaded: too many lookups wait for the upstream quota; retry later"},
		{batcher.ErrWouldMiss, cache.ErrOverloaded, im.CodeFreqLimit,
			"too many lookups for the app's upstream quota: the upstream quota cannot serve this lookup before its deadline; retry later"},
		{fmt.Errorf("shed: %w", batcher.ErrOverloaded), cache.ErrOverloaded, im.CodeFreqLimit, ""},
		{batcher.ErrClosed, cache.ErrClosed, im.CodeInternal, "proxy shutting down; retry"},
	} {
		err := loadError(tc.err)
		if !errors.Is(err, tc.is) || !errors.Is(err, tc.err) {
			t.Errorf("loadError(%v) = %v: want it to be both %v and the batcher's error", tc.err, err, tc.is)
		}
		code, info := httpapi.ErrorCode(err)
		if code != tc.code || (tc.info != "" && info != tc.info) {
			t.Errorf("%v answered %d %q, want %d %q", tc.err, code, info, tc.code, tc.info)
		}
	}
	if loadError(nil) != nil {
		t.Error("loadError(nil) is not nil")
	}
	other := errors.New("other")
	if loadError(other) != other {
		t.Error("an error that is no refusal is changed")
	}
}
