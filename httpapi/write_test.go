package httpapi

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// fakeChanger records the changes it is given.
type fakeChanger struct {
	mu      sync.Mutex
	changes []string // account/origin/event/tag=value
}

func (f *fakeChanger) Change(ctx context.Context, account string, items []upstream.ProfileItem, origin cache.Origin, event int64, at time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, it := range items {
		f.changes = append(f.changes, account+"/"+strconv.Itoa(int(origin))+"/"+strconv.FormatInt(event, 10)+"/"+it.Tag+"="+string(it.Value))
	}
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
	signed := "SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet&contenttype=json&RequestTime=" + rt + "&Sign=" + upstream.CallbackSign("tok", rt)
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
		{"old RequestTime", "POST", "SdkAppid=1400000000&RequestTime=" + old + "&Sign=" + upstream.CallbackSign("tok", old), good, 403, false},
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
	for _, p := range []string{"cb", upstream.PathGet, upstream.PathSet} {
		if _, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: &fakeChanger{}, CallbackPath: p}); err == nil {
			t.Errorf("callback path %q accepted", p)
		}
	}
	h, _ := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, upstream.PathSet, strings.NewReader("{}")))
	if w.Code != http.StatusNotFound {
		t.Fatalf("portrait_set without a setter: HTTP %d", w.Code)
	}
}

// Without a token nothing proves a callback comes from the upstream: its
// tags are dropped from the cache, its values never served.
func TestUnsignedCallbackOnlyInvalidates(t *testing.T) {
	ch := &fakeChanger{}
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, Changer: ch, CallbackPath: "/cb"})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"u1","EventTime":5,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"forged"}]}`
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", "/cb?SdkAppid=1400000000&CallbackCommand=Profile.CallbackPortraitSet", strings.NewReader(body)))
	if w.Code != 200 || len(ch.changes) != 1 || ch.changes[0] != "u1/invalidate/Tag_Profile_IM_Nick" {
		t.Fatalf("HTTP %d, changes %q", w.Code, ch.changes)
	}
}
