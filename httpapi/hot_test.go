package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// assembleRef is how answers were built before appendAnswers: an
// im.GetResponse, then encoded. appendAnswers must write the same bytes
// and count the same lookups.
func assembleRef(m *metrics.Metrics, accounts []string, answers []cache.Answer) *im.GetResponse {
	resp := &im.GetResponse{ActionStatus: im.StatusOK, UserProfileItem: make([]im.UserProfile, 0, len(accounts)),
		FailAccount: []string{}, InvalidAccount: []string{}}
	errCount, firstCode, sameCode, firstInfo := 0, 0, true, ""
	k := 0
	for _, a := range accounts {
		if !validAccount(a) {
			m.Lookups.WithLabelValues(metrics.LookupInvalid).Inc()
			resp.InvalidAccount = append(resp.InvalidAccount, a)
			resp.UserProfileItem = append(resp.UserProfileItem, im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{},
				ResultCode: im.CodeAccountNotFound, ResultInfo: "invalid account id: 1-32 bytes of printable ASCII"})
			continue
		}
		ans := answers[k]
		k++
		item := ans.Item
		switch {
		case ans.Err != nil:
			code, info := ErrorCode(ans.Err)
			item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}, ResultCode: code, ResultInfo: info}
			if errCount == 0 {
				firstCode, firstInfo = code, info
			} else if code != firstCode {
				sameCode = false
			}
			errCount++
			resp.FailAccount = append(resp.FailAccount, a)
			m.Lookups.WithLabelValues(metrics.LookupError).Inc()
		case item.ResultCode != 0:
			resp.FailAccount = append(resp.FailAccount, a)
			if im.Classify(item.ResultCode) == im.KindNotFound {
				m.Lookups.WithLabelValues(metrics.LookupNotFound).Inc()
			} else {
				m.Lookups.WithLabelValues(metrics.LookupFailed).Inc()
			}
		default:
			m.Lookups.WithLabelValues(metrics.LookupFound).Inc()
		}
		resp.UserProfileItem = append(resp.UserProfileItem, item)
	}
	if errCount > 0 && errCount == len(accounts) && sameCode {
		return fail(firstCode, firstInfo)
	}
	return resp
}

func TestAppendAnswersMatchesAssemble(t *testing.T) {
	errs := []error{context.DeadlineExceeded, context.Canceled, fmt.Errorf("wrapped: %w", context.DeadlineExceeded),
		&upstream.Error{Kind: im.KindThrottled, Code: 60007, Info: "too <frequent>"},
		&upstream.Error{Kind: im.KindHTTP, Status: 502}, errors.New("other")}
	names := []string{"u1", "u2", "ghost", "", strings.Repeat("x", 33), "bad\x01id", "é", `q"uote`, "<&>"}
	rng := rand.New(rand.NewPCG(3, 4))
	for n := range 5000 {
		var accounts []string
		var answers []cache.Answer
		oneErr := errs[rng.IntN(len(errs))]
		for range 1 + rng.IntN(6) {
			a := names[rng.IntN(len(names))]
			accounts = append(accounts, a)
			if !validAccount(a) {
				continue
			}
			var ans cache.Answer
			switch rng.IntN(5) {
			case 0:
				ans.Err = oneErr
				if rng.IntN(3) == 0 {
					ans.Err = errs[rng.IntN(len(errs))]
				}
			case 1:
				ans.Item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}, ResultCode: []int{40003, 40006, 70107}[rng.IntN(3)], ResultInfo: "no <such>"}
			default:
				ans.Item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{
					{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"n-` + strconv.Itoa(n) + `"`)}, {Tag: "Tag_Profile_IM_Level", Value: nil}}}
			}
			answers = append(answers, ans)
		}
		refM, gotM := metrics.New(prometheus.NewRegistry()), metrics.New(prometheus.NewRegistry())
		want := assembleRef(refM, accounts, answers)
		h := &Handler{m: gotM, lookups: newLookupCounters(gotM)}
		got, code := h.appendAnswers([]byte("prefix"), accounts, answers)
		if w := want.AppendJSON([]byte("prefix")); string(got) != string(w) || code != want.ErrorCode {
			t.Fatalf("accounts %q:\n got  %s (%d)\n want %s (%d)", accounts, got, code, w, want.ErrorCode)
		}
		for _, l := range []string{metrics.LookupFound, metrics.LookupInvalid, metrics.LookupError, metrics.LookupNotFound, metrics.LookupFailed} {
			if g, w := testutil.ToFloat64(gotM.Lookups.WithLabelValues(l)), testutil.ToFloat64(refM.Lookups.WithLabelValues(l)); g != w {
				t.Fatalf("accounts %q: lookups_total{%s} %v, want %v", accounts, l, g, w)
			}
		}
	}
}

func TestUnescapeQueryMatchesURL(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const alphabet = "%+aF0g9 *-_=&;é"
	for range 50000 {
		var b []byte
		for range rng.IntN(10) {
			b = append(b, alphabet[rng.IntN(len(alphabet))])
		}
		checkUnescape(t, string(b))
	}
	for _, s := range []string{"", "%", "%2", "%2A", "%2a", "%zz", "a%2Ab", "+", "a+b", "%%41", "%41%", "%4", "abc%2"} {
		checkUnescape(t, s)
	}
}

func checkUnescape(t *testing.T, s string) {
	t.Helper()
	want, err := url.QueryUnescape(s)
	got, ok := unescapeQuery(nil, s)
	if ok != (err == nil) || ok && string(got) != want || validEscapes(s) != (err == nil) {
		t.Fatalf("%q: got %q %v (valid %v), want %q %v", s, got, ok, validEscapes(s), want, err)
	}
}

// TestEscapedSigRemembered: a UserSig sent escaped (url.Values.Encode
// escapes its '*') is accepted, remembered, and still bound to its
// identifier and expiry.
func TestEscapedSigRemembered(t *testing.T) {
	now := time.Now()
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	var sig string
	for i := 0; !strings.Contains(sig, "*"); i++ {
		sig = usersig.Sign(key, app, "administrator", now.Add(time.Duration(i)*time.Second), time.Hour)
	}
	body := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	q := url.Values{"sdkappid": {"1400000000"}, "identifier": {"administrator"}, "usersig": {sig}}
	if !strings.Contains(q.Encode(), "%2A") {
		t.Fatalf("query %s: the sig is not escaped", q.Encode())
	}
	for range 2 {
		if _, out, raw := do(t, h, http.MethodPost, q, body); out.ErrorCode != 0 {
			t.Fatalf("escaped sig refused: %s", raw)
		}
	}
	if h.sigs.m.len() != 1 {
		t.Fatalf("sig not remembered once")
	}
	q.Set("identifier", "bob")
	if _, out, raw := do(t, h, http.MethodPost, q, body); out.ErrorCode != 70013 {
		t.Fatalf("remembered sig accepted for another identifier: %s", raw)
	}
	q.Set("identifier", "administrator")
	now = now.Add(2 * time.Hour)
	if _, out, raw := do(t, h, http.MethodPost, q, body); out.ErrorCode != 70001 {
		t.Fatalf("remembered sig accepted past its expiry: %s", raw)
	}
	q2 := q.Encode() + "&x=%zz"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, im.PathGet+"?"+q2, strings.NewReader(body)))
	if !strings.Contains(rec.Body.String(), `"ErrorCode":60002`) || !strings.Contains(rec.Body.String(), "not well-formed") {
		t.Fatalf("malformed escape in another parameter: %s", rec.Body.String())
	}
}

// TestSigCacheBounded: the remembered sigs are emptied when full.
func TestSigCacheBounded(t *testing.T) {
	c := sigCache{m: snapMap[verified]{max: sigCacheMax}}
	now := time.Now()
	for i := range sigCacheMax + 1 {
		id := "a" + strconv.Itoa(i)
		if err := c.verify(usersig.Sign(key, app, id, now, time.Hour), id, key, app, now); err != nil {
			t.Fatal(err)
		}
	}
	if n := c.m.len(); n != 1 {
		t.Fatalf("%d sigs held after %d; want the map emptied at %d", n, sigCacheMax+1, sigCacheMax)
	}
}

// TestDeadlineCtx: the lazily made context behaves as WithDeadline.
func TestDeadlineCtx(t *testing.T) {
	t.Run("own deadline", func(t *testing.T) {
		d := time.Now().Add(30 * time.Millisecond)
		c := &deadlineCtx{parent: context.Background(), deadline: d}
		if got, ok := c.Deadline(); !ok || !got.Equal(d) {
			t.Fatalf("Deadline %v %v", got, ok)
		}
		child, cancel := context.WithCancel(c)
		defer cancel()
		select {
		case <-child.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("child not cancelled at the deadline")
		}
		if !errors.Is(c.Err(), context.DeadlineExceeded) || !errors.Is(child.Err(), context.DeadlineExceeded) {
			t.Fatalf("Err %v, child %v", c.Err(), child.Err())
		}
		c.end()
	})
	t.Run("parent sooner", func(t *testing.T) {
		type key struct{}
		parent, cancel := context.WithTimeout(context.WithValue(context.Background(), key{}, "v"), time.Hour)
		defer cancel()
		c := &deadlineCtx{parent: parent, deadline: time.Now().Add(2 * time.Hour)}
		pd, _ := parent.Deadline()
		if got, ok := c.Deadline(); !ok || !got.Equal(pd) {
			t.Fatalf("Deadline %v, want the parent's %v", got, pd)
		}
		if c.Value(key{}) != "v" {
			t.Fatal("value of the parent lost")
		}
		cancel()
		<-c.Done()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("Err %v", c.Err())
		}
	})
	t.Run("ended", func(t *testing.T) {
		c := &deadlineCtx{parent: context.Background(), deadline: time.Now().Add(time.Hour)}
		c.end()
		if !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("made after end: Err %v", c.Err())
		}
		c2 := &deadlineCtx{parent: context.Background(), deadline: time.Now().Add(time.Hour)}
		done := c2.Done()
		c2.end()
		<-done
		if !errors.Is(c2.Err(), context.Canceled) {
			t.Fatalf("made before end: Err %v", c2.Err())
		}
	})
	t.Run("a parent's own WithDeadline", func(t *testing.T) {
		p := &deadliner{Context: context.Background()}
		d := time.Now().Add(time.Hour)
		c := &deadlineCtx{parent: p, deadline: d}
		c.Done() // made through the parent, with the deadline
		if len(p.asked) != 1 || !p.asked[0].Equal(d) {
			t.Fatalf("parent asked %v, want once with %v", p.asked, d)
		}
		// Made after the lookup ended (a context kept past it): the parent,
		// which may serve another request by then, is not asked.
		late := &deadlineCtx{parent: p, deadline: d}
		late.end()
		if !errors.Is(late.Err(), context.Canceled) || len(p.asked) != 1 {
			t.Fatalf("made after end: Err %v, parent asked %d times", late.Err(), len(p.asked))
		}
	})
	t.Run("hit never makes it", func(t *testing.T) {
		h := newHandler(t, &fakeLookup{}, AuthNone)
		var seen *deadlineCtx
		h.cfg.Lookup = lookupFunc(func(ctx context.Context, accounts, tags []string) []cache.Answer {
			seen = ctx.(*deadlineCtx)
			if d, ok := ctx.Deadline(); !ok || time.Until(d) > h.cfg.RequestTimeout || time.Until(d) < h.cfg.RequestTimeout-time.Minute {
				t.Errorf("deadline %v", d)
			}
			return make([]cache.Answer, len(accounts))
		})
		do(t, h, http.MethodPost, url.Values{}, `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`)
		if seen == nil || seen.made.Load() {
			t.Fatal("the context was made for a lookup that never waited")
		}
	})
}

type lookupFunc func(ctx context.Context, accounts, tags []string) []cache.Answer

func (f lookupFunc) Get(ctx context.Context, accounts, tags []string) []cache.Answer {
	return f(ctx, accounts, tags)
}

// Hits declines: every lookup goes to the function.
func (f lookupFunc) Hits(dst []cache.Answer, items []im.ProfileItem, _, _ []string) ([]cache.Answer, []im.ProfileItem, bool) {
	return dst, items, false
}

// TestRoutingMatchesMux: serving portrait_get without the mux picks the
// handler the mux picks, for every spelling of the path.
func TestRoutingMatchesMux(t *testing.T) {
	h := newHandler(t, &fakeLookup{}, AuthNone)
	viaMux := func(w http.ResponseWriter, r *http.Request) {
		p, ok := canonicalPath(r.URL.Path)
		if !ok {
			h.noSuchAPI(w, r.URL.Path)
			return
		}
		if p != r.URL.Path {
			u := *r.URL
			u.Path, u.RawPath = p, ""
			r2 := *r
			r2.URL = &u
			r = &r2
		}
		h.mux.ServeHTTP(w, r)
	}
	body := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	for _, target := range []string{im.PathGet, im.PathGet + "/", "/" + im.PathGet, "/v4/profile/portrait%5Fget", "/v4/profile%2Fportrait_get",
		"/v4//profile/portrait_get", "/v4/profile/./portrait_get", im.PathGet + "x", "/V4/profile/portrait_get"} {
		for _, method := range []string{http.MethodPost, http.MethodGet} {
			got, want := httptest.NewRecorder(), httptest.NewRecorder()
			h.ServeHTTP(got, httptest.NewRequest(method, target, strings.NewReader(body)))
			viaMux(want, httptest.NewRequest(method, target, strings.NewReader(body)))
			if got.Code != want.Code || got.Body.String() != want.Body.String() {
				t.Errorf("%s %s: %d %s, the mux: %d %s", method, target, got.Code, got.Body, want.Code, want.Body)
			}
		}
	}
}

// TestConcurrentDistinctRequests runs many distinct requests at once
// through a real server (pooled buffers, remembered tag lists and sigs
// shared between them) and checks every answer is its own.
func TestConcurrentDistinctRequests(t *testing.T) {
	h := newHandler(t, &fakeLookup{}, AuthUserSig)
	srv := httptest.NewServer(h)
	defer srv.Close()
	tagSets := [][]string{{"Tag_Profile_IM_Nick"}, {"Tag_Profile_IM_Level", "Tag_Profile_IM_Nick"}, {"Tag_Profile_Custom_Ab"},
		{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Ab", "Tag_Profile_IM_Nick"}}
	const workers, perWorker = 16, 150
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := query()
			// Sigs of their own for some, so remembering them races too.
			q.Set("usersig", usersig.Sign(key, app, "administrator", time.Now().Add(-time.Duration(w%5)*time.Second), time.Hour))
			for i := range perWorker {
				accounts := []string{fmt.Sprintf("w%d-%d", w, i)}
				for j := range i % 4 {
					accounts = append(accounts, fmt.Sprintf("w%d-%d-%d", w, i, j))
				}
				tags := tagSets[(w+i)%len(tagSets)]
				if err := checkOne(srv.URL, q, accounts, tags); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func checkOne(base string, q url.Values, accounts, tags []string) error {
	body, _ := json.Marshal(im.GetRequest{ToAccount: accounts, TagList: tags})
	resp, err := http.Post(base+im.PathGet+"?"+q.Encode(), "application/json", strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out im.GetResponse
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("answer %q: %v", raw, err)
	}
	if resp.Header.Get("Content-Length") != strconv.Itoa(len(raw)) {
		return fmt.Errorf("Content-Length %q for %d bytes", resp.Header.Get("Content-Length"), len(raw))
	}
	want := im.DedupTags(tags)
	if out.ErrorCode != 0 || len(out.UserProfileItem) != len(accounts) {
		return fmt.Errorf("request %s: answer %s", body, raw)
	}
	for i, it := range out.UserProfileItem {
		var got []string
		for _, p := range it.ProfileItem {
			got = append(got, p.Tag)
			if string(p.Value) != `"v-`+accounts[i]+`"` {
				return fmt.Errorf("request %s: item %d holds %s", body, i, p.Value)
			}
		}
		if it.ToAccount != accounts[i] || !slices.Equal(got, want) {
			return fmt.Errorf("request %s: item %d is %+v", body, i, it)
		}
	}
	return nil
}

// deadliner is a parent that makes WithDeadline of itself, as the front's
// request context does, recording the deadlines asked.
type deadliner struct {
	context.Context
	asked []time.Time
}

func (p *deadliner) WithDeadline(d time.Time) (context.Context, context.CancelFunc) {
	p.asked = append(p.asked, d)
	return context.WithDeadline(p.Context, d)
}
