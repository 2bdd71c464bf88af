package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// fakeChanger records the changes it is given.
type fakeChanger struct {
	mu      sync.Mutex
	changes []string // account/origin/event/tag=value
}

func (f *fakeChanger) Change(ctx context.Context, account string, items []im.ProfileItem, origin cache.Origin, event int64, at time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, it := range items {
		f.changes = append(f.changes, account+"/"+strconv.Itoa(int(origin))+"/"+strconv.FormatInt(event, 10)+"/"+it.Tag+"="+string(it.Value))
	}
	return nil
}

func (f *fakeChanger) Drop(ctx context.Context, account string, tags []string, at time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changes = append(f.changes, account+"/drop/"+strings.Join(tags, ","))
	return nil
}

func (f *fakeChanger) Invalidate(ctx context.Context, account string, tags []string, cause cache.Origin, at time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.changes = append(f.changes, account+"/invalidate/"+strings.Join(tags, ","))
	return nil
}

func TestCallbackReceiver(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb",
		CallbackToken: "tok", Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	rt := strconv.FormatInt(now.Unix(), 10)
	signed := "SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet&contenttype=json&RequestTime=" + rt + "&Sign=" + im.CallbackSign("tok", rt)
	good := `{"CallbackCommand":"Profile.CallbackPortraitSet","Operator_Account":"u1","From_Account":"u1","EventTime":1800000000123,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"n e w"}]}`
	old := strconv.FormatInt(now.Add(-10*time.Minute).Unix(), 10)
	cases := []struct {
		name, method, query, body string
		status                    int
		applied                   bool
	}{
		{"good", "POST", signed, good, 200, true},
		{"GET", "GET", signed, "", 405, false},
		{"other app", "POST", strings.Replace(signed, "1400000000", "1400000001", 1), good, 403, false},
		{"no app", "POST", strings.Replace(signed, "SdkAppid=1400000000&", "", 1), good, 403, false},
		{"unsigned", "POST", "SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet", good, 403, false},
		{"wrong sign", "POST", strings.Replace(signed, "Sign=", "Sign=0", 1), good, 403, false},
		{"old RequestTime", "POST", "SdkAppid=1400000000&RequestTime=" + old + "&Sign=" + im.CallbackSign("tok", old), good, 403, false},
		{"not JSON", "POST", signed, `{`, 400, false},
		{"no EventTime", "POST", signed, strings.Replace(good, `"EventTime":1800000000123,`, "", 1), 400, false},
		{"bad account", "POST", signed, strings.Replace(good, `"From_Account":"u1"`, `"From_Account":""`, 1), 400, false},
		{"bad tag", "POST", signed, strings.Replace(good, "Tag_Profile_IM_Nick", "Nick", 1), 400, false},
		{"other command", "POST", strings.Replace(signed, "Profile.CallbackPortraitSet", "State.StateChange", 1),
			`{"CallbackCommand":"State.StateChange"}`, 200, false},
	}
	for _, c := range cases {
		before := len(ch.changes)
		req := httptest.NewRequest(c.method, "/cb?"+c.query, strings.NewReader(c.body))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != c.status {
			t.Errorf("%s: HTTP %d, want %d (%s)", c.name, w.Code, c.status, w.Body)
		}
		if applied := len(ch.changes) > before; applied != c.applied {
			t.Errorf("%s: applied %v, want %v", c.name, applied, c.applied)
		}
		if !strings.Contains(w.Body.String(), `"ActionStatus"`) {
			t.Errorf("%s: not an IM envelope: %s", c.name, w.Body)
		}
	}
	if want := `u1/2/1800000000123/Tag_Profile_IM_Nick="n e w"`; len(ch.changes) == 0 || ch.changes[0] != want {
		t.Fatalf("changes %q, want %q", ch.changes, want)
	}
}

func TestCallbackPathChecked(t *testing.T) {
	for _, p := range []string{"cb", im.PathGet, im.PathSet} {
		if _, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: &fakeChanger{}, CallbackPath: p, CallbackToken: "tok"}); err == nil {
			t.Errorf("callback path %q accepted", p)
		}
	}
	h, _ := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, im.PathSet, strings.NewReader("{}")))
	if w.Code != http.StatusNotFound {
		t.Fatalf("portrait_set without a setter: HTTP %d", w.Code)
	}
}

// Without a token nothing proves a callback comes from the upstream: its
// tags are dropped from the cache, its values never served.
func TestUnsignedCallbackOnlyInvalidates(t *testing.T) {
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb", CallbackUnsigned: true})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"u1","EventTime":5,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"forged"}]}`
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", "/cb?SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet", strings.NewReader(body)))
	if w.Code != 200 || len(ch.changes) != 1 || ch.changes[0] != "u1/drop/Tag_Profile_IM_Nick" {
		t.Fatalf("HTTP %d, changes %q", w.Code, ch.changes)
	}
}

// Without a token the receiver exists only when asked for explicitly.
func TestCallbackReceiverNeedsTokenOrUnsigned(t *testing.T) {
	if _, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: &fakeChanger{}, CallbackPath: "/cb"}); err == nil {
		t.Fatal("a receiver without a token and without CallbackUnsigned was built")
	}
	for _, cfg := range []Config{{CallbackToken: "tok"}, {CallbackUnsigned: true}} {
		cfg.Lookup, cfg.SDKAppID, cfg.Key, cfg.Changer, cfg.CallbackPath = &fakeLookup{}, app, key, &fakeChanger{}, "/cb"
		if _, err := New(cfg); err != nil {
			t.Fatal(err)
		}
	}
}

// signedCallback returns a request for a signed callback of body at rt.
func signedCallback(rt time.Time, token, body string) *http.Request {
	s := strconv.FormatInt(rt.Unix(), 10)
	return httptest.NewRequest("POST", "/cb?SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet&RequestTime="+s+
		"&Sign="+im.CallbackSign(token, s), strings.NewReader(body))
}

func nickCallback(account string, event int64, value string) string {
	return `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"` + account + `","EventTime":` +
		strconv.FormatInt(event, 10) + `,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"` + value + `"}]}`
}

// A signed callback stamped beyond now + the clock skew is refused: it
// would outrank every later change.
func TestCallbackFromTheFutureRefused(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb", CallbackToken: "tok",
		ClockSkew: time.Second, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		event  time.Time
		status int
	}{
		{now.AddDate(10, 0, 0), 400},
		{now.Add(1001 * time.Millisecond), 400},
		{now.Add(time.Second), 200}, // within the skew
		{now.Add(-time.Minute), 200},
	} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, signedCallback(now, "tok", nickCallback("u1", c.event.UnixMilli(), "v"+c.event.String())))
		if w.Code != c.status || !strings.Contains(w.Body.String(), `"ActionStatus"`) {
			t.Errorf("EventTime now%+v: HTTP %d (%s), want %d", c.event.Sub(now), w.Code, w.Body, c.status)
		}
	}
	if len(ch.changes) != 2 {
		t.Fatalf("changes applied: %q", ch.changes)
	}
}

// An exact repeat of a signed callback (same RequestTime, Sign and body) is
// acknowledged and not applied again, for as long as its signature can be
// valid; the same signed URL with another body is a different callback.
func TestSignedCallbackReplayNotApplied(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	clock := now
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb", CallbackToken: "tok",
		Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	e := now.UnixMilli()
	send := func(body string) int {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, signedCallback(now, "tok", body))
		return w.Code
	}
	for i, step := range []struct {
		body    string
		at      time.Duration
		applied int // changes so far
	}{
		{nickCallback("u1", e, "A"), 0, 1},
		{nickCallback("u1", e, "A"), time.Second, 1},                    // repeat
		{nickCallback("u1", e, "B"), 2 * time.Second, 2},                // another body under the same signature
		{nickCallback("u1", e, "A"), 4*time.Minute + 59*time.Second, 2}, // repeat, still in the window
	} {
		clock = now.Add(step.at)
		if code := send(step.body); code != 200 {
			t.Fatalf("step %d: HTTP %d", i, code)
		}
		if len(ch.changes) != step.applied {
			t.Fatalf("step %d: changes %q, want %d", i, ch.changes, step.applied)
		}
	}
	if n := testutil.ToFloat64(h.m.Callbacks.WithLabelValues("repeat")); n != 2 {
		t.Fatalf("callbacks_total{repeat} = %v", n)
	}
}

// The memo stays bounded however many distinct callbacks arrive.
func TestReplayMemoBounded(t *testing.T) {
	var m replayMemo
	now := time.Unix(1_800_000_000, 0)
	for i := range 3 * maxReplays {
		if m.seen(replayKey("1", "s", []byte(strconv.Itoa(i))), now) {
			t.Fatalf("key %d seen before", i)
		}
		if n := len(m.cur) + len(m.prev); n > 2*maxReplays {
			t.Fatalf("%d keys held", n)
		}
	}
	if !m.seen(replayKey("1", "s", []byte(strconv.Itoa(3*maxReplays-1))), now) {
		t.Fatal("the latest key was forgotten")
	}
}

// Unsigned callbacks are bounded per second; beyond, HTTP 429 and nothing
// dropped.
func TestUnsignedCallbacksRateBounded(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb", CallbackUnsigned: true,
		CallbackUnsignedRate: 10, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	codes := map[int]int{}
	for i := range 25 {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("POST", "/cb?SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet",
			strings.NewReader(nickCallback("u"+strconv.Itoa(i), now.UnixMilli(), "x"))))
		codes[w.Code]++
	}
	if codes[200] != 10 || codes[429] != 15 || len(ch.changes) != 10 {
		t.Fatalf("answers %v, %d dropped", codes, len(ch.changes))
	}
	now = now.Add(time.Second) // a second later, ten more
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", "/cb?SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet",
		strings.NewReader(nickCallback("u1", now.UnixMilli(), "x"))))
	if w.Code != 200 {
		t.Fatalf("after a second: HTTP %d", w.Code)
	}
}

// fakeSetter answers portrait_set with err and counts its calls.
type fakeSetter struct {
	calls int
	err   error
}

func (f *fakeSetter) PortraitSet(ctx context.Context, req im.SetRequest) error {
	f.calls++
	return f.err
}

func setBody() string {
	return `{"From_Account":"u1","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"x"}]}`
}

func doSet(t *testing.T, h http.Handler, q string) im.Envelope {
	t.Helper()
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", im.PathSet+"?"+q, strings.NewReader(setBody())))
	var e im.Envelope
	if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &e) != nil {
		t.Fatalf("HTTP %d: %s", w.Code, w.Body)
	}
	return e
}

// -auth none opens reads only: portrait_set needs -auth-none-writes too.
func TestAuthNoneKeepsWritesOff(t *testing.T) {
	for _, writes := range []bool{false, true} {
		st, ch := &fakeSetter{}, &fakeChanger{}
		h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Auth: AuthNone, AuthNoneWrites: writes, Setter: st, Changer: ch})
		if err != nil {
			t.Fatal(err)
		}
		e := doSet(t, h, "")
		if !writes && (e.ErrorCode != im.CodeNeedAdmin || st.calls != 0 || len(ch.changes) != 0) {
			t.Fatalf("-auth none: %+v, %d upstream calls, changes %q", e, st.calls, ch.changes)
		}
		if writes && (e.ErrorCode != 0 || st.calls != 1 || len(ch.changes) != 1) {
			t.Fatalf("-auth none -auth-none-writes: %+v, %d upstream calls", e, st.calls)
		}
	}
}

// A set refused in its last attempt after an earlier attempt got no answer
// may have been applied: the cached tags are dropped, and the caller gets
// the last refusal.
func TestSetMaybeAppliedInvalidates(t *testing.T) {
	throttled := &upstream.Error{Code: im.CodeFreqLimit, Info: "throttled"}
	for _, c := range []struct {
		name       string
		err        error
		code       int
		invalidate bool
	}{
		{"refused", throttled, im.CodeFreqLimit, false},
		{"no answer, then refused", errors.Join(ErrMaybeApplied, throttled), im.CodeFreqLimit, true},
		{"no answer", context.DeadlineExceeded, 0, true},
	} {
		ch := &fakeChanger{}
		h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Setter: &fakeSetter{err: c.err}, Changer: ch})
		if err != nil {
			t.Fatal(err)
		}
		e := doSet(t, h, query().Encode())
		if c.code != 0 && e.ErrorCode != c.code {
			t.Errorf("%s: %+v, want code %d", c.name, e, c.code)
		}
		if got := len(ch.changes) == 1 && strings.Contains(ch.changes[0], "/invalidate/"); got != c.invalidate {
			t.Errorf("%s: changes %q, want invalidation %v", c.name, ch.changes, c.invalidate)
		}
	}
}
