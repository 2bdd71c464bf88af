package httpapi

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// sigVariant is the i-th spelling of sig that Verify reads as sig itself:
// base64 decoding skips '\r' and '\n', so a '\n' and a '\r' put anywhere
// make another string with the same claims and a valid HMAC.
func sigVariant(sig string, i int) string {
	n := len(sig) + 1
	p, q := i%n, (i/n)%n
	s := sig[:p] + "\n" + sig[p:]
	return s[:q] + "\r" + s[q:]
}

// TestSigCacheInsertCostFlat: any holder of a valid UserSig for any
// identifier of the app (an end user of the app, not the admin) can mint
// as many distinct valid sigs as they like; each is verified, remembered
// (before the admin check refuses the call), and each insertion must not
// cost in proportion to what the cache already holds: a copy-on-write map
// of up to sigCacheMax entries, copied under one mutex for every such
// request, lets one caller make every other caller's sig verification
// wait behind it.
func TestSigCacheInsertCostFlat(t *testing.T) {
	now := time.Now()
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	sig := usersig.Sign(key, app, "mallory", now, time.Hour) // an end user's own sig
	body := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	q := url.Values{"sdkappid": {"1400000000"}, "identifier": {"mallory"}, "usersig": {sigVariant(sig, 0)}}
	if _, out, raw := do(t, h, http.MethodPost, q, body); out.ErrorCode != im.CodeNeedAdmin {
		t.Fatalf("variant not verified as mallory's sig: %s", raw)
	}
	if h.sigs.m.len() != 1 {
		t.Fatal("a refused non-admin call's sig is not remembered: the attack below does not apply")
	}
	next := 1
	// insertCost is the bytes allocated per verification of a fresh
	// variant, through the hit path's query check.
	insertCost := func() (float64, time.Duration) {
		const n = 40
		reqs := make([]*http.Request, n)
		for i := range reqs {
			v := url.Values{"sdkappid": {"1400000000"}, "identifier": {"mallory"}, "usersig": {sigVariant(sig, next)}}
			next++
			reqs[i] = httptest.NewRequest(http.MethodPost, im.PathGet+"?"+v.Encode(), nil)
		}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		start := time.Now()
		for _, r := range reqs {
			if e := h.verifyQueryAt(r, true, now); e == nil || e.ErrorCode != im.CodeNeedAdmin {
				t.Fatalf("variant: %+v", e)
			}
		}
		took := time.Since(start) / n
		runtime.ReadMemStats(&after)
		return float64(after.TotalAlloc-before.TotalAlloc) / n, took
	}
	small, smallTook := insertCost()
	for h.sigs.m.len() < sigCacheMax-100 {
		r := httptest.NewRequest(http.MethodPost, im.PathGet+"?"+url.Values{"sdkappid": {"1400000000"},
			"identifier": {"mallory"}, "usersig": {sigVariant(sig, next)}}.Encode(), nil)
		next++
		h.verifyQueryAt(r, true, now)
	}
	large, largeTook := insertCost()
	t.Logf("per fresh sig: %.0f bytes, %v with a near-empty cache; %.0f bytes, %v with %d held",
		small, smallTook, large, largeTook, h.sigs.m.len())
	if large > 3*small {
		t.Fatalf("verifying one more sig costs %.0f bytes with a full cache against %.0f with an empty one: insertion copies the whole map", large, small)
	}
}

// TestTagSetInsertCostFlat: a TagList text not seen before must not cost
// the scanner path more than encoding/json costs for the same body. The
// remembered lists are keyed by raw text, so every spelling (whitespace,
// order: a client building TagList from a map sends its tags in random
// order) is a new key, and each new key copies the whole map (up to
// tagSetsMax entries) under one mutex.
func TestTagSetInsertCostFlat(t *testing.T) {
	h := diffHandler(t)
	tags := []string{`"Tag_Profile_IM_Nick"`, `"Tag_Profile_IM_Level"`, `"Tag_Profile_IM_Gender"`, `"Tag_Profile_IM_Image"`, `"Tag_Profile_Custom_Ab"`}
	next := 0
	// body is the i-th spelling of one request: its tags in another order
	// and spacing, so its TagList text is new.
	body := func() []byte {
		i := next
		next++
		list := slices.Clone(tags)
		for k := len(list) - 1; k > 0; k-- { // the i-th permutation (mixed radix)
			j := i % (k + 1)
			i /= k + 1
			list[k], list[j] = list[j], list[k]
		}
		return []byte(`{"To_Account":["u1"],"TagList":[` + strings.Join(list, ","+strings.Repeat(" ", i)) + `]}`)
	}
	cost := func(fast bool) float64 {
		const n = 50
		bodies := make([][]byte, n)
		for i := range bodies {
			bodies[i] = body()
		}
		var s getScan
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		for _, b := range bodies {
			var e *im.GetResponse
			if fast {
				_, _, e = h.decodeGet(b, &s, nil)
			} else {
				_, _, e = decode(b, diffMaxAccounts)
			}
			if e != nil {
				t.Fatalf("%s: %+v", b, e)
			}
		}
		runtime.ReadMemStats(&after)
		return float64(after.TotalAlloc-before.TotalAlloc) / n
	}
	for h.tagSets.m.len() < tagSetsMax-60 {
		var s getScan
		h.decodeGet(body(), &s, nil)
	}
	fast, viaJSON := cost(true), cost(false)
	t.Logf("bytes per body with a new TagList text: %.0f scanner path (%d lists held), %.0f encoding/json", fast, h.tagSets.m.len(), viaJSON)
	// Amortised folding of the remembered lists costs a little per new
	// text; copying the whole map per text cost 44 times encoding/json.
	if fast > 2*viaJSON {
		t.Fatalf("the scanner path allocates %.0f bytes for a new TagList text, encoding/json %.0f", fast, viaJSON)
	}
}

// TestNoBodyLimitOverflow: a Config.MaxBodyBytes of math.MaxInt64 ("no
// limit" to a library user) worked with http.MaxBytesReader, which guards
// its limit+1 against overflow; readLimited's limit+1 wraps negative and
// slices with it.
func TestNoBodyLimitOverflow(t *testing.T) {
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Auth: AuthNone, MaxBodyBytes: math.MaxInt64})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("portrait_get panicked with MaxBodyBytes = MaxInt64: %v", p)
		}
	}()
	if _, out, raw := do(t, h, http.MethodPost, url.Values{}, `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`); out.ErrorCode != 0 {
		t.Fatalf("answer %s", raw)
	}
}

// TestTagSetsConcurrentFlush: many goroutines decode bodies whose TagList
// texts overflow the remembered lists (so the map is replaced and emptied
// while others read it) and each must get its own tags; with -race, any
// unsynchronised access to the shared lists shows.
func TestTagSetsConcurrentFlush(t *testing.T) {
	h := diffHandler(t)
	all := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_IM_Gender", "Tag_Profile_Custom_Ab", "Tag_Profile_Custom_Cd"}
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var s getScan
			for i := range 400 {
				n := 1 + (w+i)%len(all)
				want := all[:n]
				body := `{"To_Account":["u1"],"TagList":[` + strings.Repeat(" ", (w*400+i)%300) + `"` + strings.Join(want, `","`) + `"]}`
				_, got, e := h.decodeGet([]byte(body), &s, nil)
				if e != nil || !slices.Equal(got, want) {
					errs <- body
					return
				}
				_ = append(got, "x") // a caller appending must not reach the shared list
			}
		}()
	}
	wg.Wait()
	close(errs)
	for b := range errs {
		t.Errorf("wrong tags for %s", b)
	}
}

// TestSigCacheConcurrent: insertions and lock-free lookups at once (run
// with -race); a sig remembered for one identifier never passes for
// another, nor after its expiry.
func TestSigCacheConcurrent(t *testing.T) {
	c := sigCache{m: snapMap[verified]{max: sigCacheMax}}
	now := time.Now()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "user" + strconv.Itoa(w)
			sig := usersig.Sign(key, app, id, now, 10*time.Second)
			for i := range 100 {
				v := sigVariant(sig, i)
				if err := c.verify(v, id, key, app, now); err != nil {
					t.Error(err)
					return
				}
				if !c.known(v, id, now) || !c.knownBytes([]byte(v), id, now) {
					t.Error("verified sig not known")
				}
				if c.known(v, "user"+strconv.Itoa(w+1), now) || c.known(v, id, now.Add(11*time.Second)) {
					t.Error("sig known for another identifier or past its expiry")
				}
			}
		}()
	}
	wg.Wait()
}

// TestLookupBoundedByRequestTimeout: a lookup that waits (a miss, a slow
// Redis, a slow upstream) is cut at RequestTimeout through the lazily made
// context, and sees at once a client context already cancelled.
func TestLookupBoundedByRequestTimeout(t *testing.T) {
	wait := lookupFunc(func(ctx context.Context, accounts, tags []string) []cache.Answer {
		out := make([]cache.Answer, len(accounts))
		select {
		case <-ctx.Done():
			for i := range out {
				out[i].Err = ctx.Err()
			}
		case <-time.After(10 * time.Second):
		}
		return out
	})
	h, err := New(Config{Lookup: wait, SDKAppID: app, Auth: AuthNone, RequestTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	start := time.Now()
	if _, out, raw := do(t, h, http.MethodPost, url.Values{}, body); out.ErrorCode != im.CodeInternalTimeout || time.Since(start) > 5*time.Second {
		t.Fatalf("slow lookup: %s after %v", raw, time.Since(start))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, im.PathGet, strings.NewReader(body))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req) // "request cancelled", not the deadline's "timed out"
	if !strings.Contains(rec.Body.String(), "request cancelled") {
		t.Fatalf("cancelled client: %s", rec.Body)
	}
}

// TestReadLimitedMatchesMaxBytesReader: readLimited reads what
// io.ReadAll(http.MaxBytesReader(...)) reads, and fails where it fails,
// for bodies around the limit delivered in odd pieces, into buffers of
// any starting size.
func TestReadLimitedMatchesMaxBytesReader(t *testing.T) {
	const limit = 64
	readers := map[string]func(io.Reader) io.Reader{
		"plain": func(r io.Reader) io.Reader { return r }, "one byte": iotest.OneByteReader,
		"half": iotest.HalfReader, "data+EOF": iotest.DataErrReader,
	}
	for name, wrap := range readers {
		for n := 0; n <= limit+3; n++ {
			for _, c := range []int{0, 1, limit - 1, limit, limit + 1, 4 * limit} {
				body := bytes.Repeat([]byte{'x'}, n)
				want, wantErr := io.ReadAll(http.MaxBytesReader(nil, io.NopCloser(wrap(bytes.NewReader(body))), limit))
				got, gotErr := readLimited(wrap(bytes.NewReader(body)), limit, make([]byte, 0, c))
				var tooBigW, tooBigG *http.MaxBytesError
				if errors.As(wantErr, &tooBigW) != errors.As(gotErr, &tooBigG) || (wantErr == nil) != (gotErr == nil) ||
					(wantErr == nil && !bytes.Equal(got, want)) {
					t.Errorf("%s, %d bytes, cap %d: got %d bytes %v, want %d bytes %v", name, n, c, len(got), gotErr, len(want), wantErr)
				}
			}
		}
	}
}
