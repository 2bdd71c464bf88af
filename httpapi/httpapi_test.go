package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

const (
	app = 1400000000
	key = "test-secret-key"
)

// fakeLookup answers "v-<account>" for every tag and records its calls.
type fakeLookup struct {
	mu    sync.Mutex
	calls [][]string
	err   map[string]error // per account
}

// Hits declines: every lookup is recorded by Get.
func (f *fakeLookup) Hits(dst []cache.Answer, items []im.ProfileItem, _, _ []string) ([]cache.Answer, []im.ProfileItem, bool) {
	return dst, items, false
}

func (f *fakeLookup) Get(ctx context.Context, accounts, tags []string) []cache.Answer {
	f.mu.Lock()
	f.calls = append(f.calls, slices.Clone(accounts))
	f.mu.Unlock()
	out := make([]cache.Answer, len(accounts))
	for i, a := range accounts {
		if err := f.err[a]; err != nil {
			out[i] = cache.Answer{Err: err}
			continue
		}
		it := im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}}
		if a == "ghost" {
			it.ResultCode = 40003
		} else {
			for _, t := range tags {
				it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: json.RawMessage(`"v-` + a + `"`)})
			}
		}
		out[i] = cache.Answer{Item: it}
	}
	return out
}

func newHandler(t *testing.T, l Lookup, auth string) *Handler {
	t.Helper()
	h, err := New(Config{Lookup: l, SDKAppID: app, Key: key, Auth: auth})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func query() url.Values {
	return url.Values{"sdkappid": {"1400000000"}, "identifier": {"administrator"}, "random": {"1"}, "contenttype": {"json"},
		"usersig": {usersig.Sign(key, app, "administrator", time.Now(), time.Hour)}}
}

func do(t *testing.T, h http.Handler, method string, q url.Values, body string) (int, im.GetResponse, string) {
	t.Helper()
	req := httptest.NewRequest(method, im.PathGet+"?"+q.Encode(), strings.NewReader(body))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	var out im.GetResponse
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil {
		t.Fatalf("answer is not JSON: %q", rec.Body.String())
	}
	return rec.Code, out, rec.Body.String()
}

func TestCallerErrorsNeverReachLookup(t *testing.T) {
	good := `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`
	many := `{"To_Account":[` + strings.Repeat(`"u",`, 1000) + `"u"],"TagList":["Tag_Profile_IM_Nick"]}`
	tests := []struct {
		name   string
		method string
		q      func(url.Values)
		body   string
		code   int
	}{
		{"GET", http.MethodGet, nil, good, 60002},
		{"no sdkappid", "", func(q url.Values) { q.Del("sdkappid") }, good, 60012},
		{"other app", "", func(q url.Values) { q.Set("sdkappid", "1") }, good, 60006},
		{"no usersig", "", func(q url.Values) { q.Del("usersig") }, good, 70002},
		{"garbage usersig", "", func(q url.Values) { q.Set("usersig", "%%%") }, good, 70003},
		{"expired usersig", "", func(q url.Values) {
			q.Set("usersig", usersig.Sign(key, app, "administrator", time.Now().Add(-2*time.Hour), time.Hour))
		}, good, 70001},
		{"wrong key", "", func(q url.Values) {
			q.Set("usersig", usersig.Sign("other", app, "administrator", time.Now(), time.Hour))
		}, good, 70009},
		{"sig of another identifier", "", func(q url.Values) { q.Set("identifier", "bob") }, good, 70013},
		{"sig of another app", "", func(q url.Values) { q.Set("usersig", usersig.Sign(key, 7, "administrator", time.Now(), time.Hour)) }, good, 70014},
		{"not admin", "", func(q url.Values) {
			q.Set("identifier", "bob")
			q.Set("usersig", usersig.Sign(key, app, "bob", time.Now(), time.Hour))
		}, good, 40004},
		{"empty body", "", nil, ``, 60003},
		{"bad json", "", nil, `{"To_Account":[`, 60003},
		{"json array", "", nil, `[1,2]`, 40001},
		{"To_Account not array", "", nil, `{"To_Account":"u1","TagList":["Tag_Profile_IM_Nick"]}`, 40001},
		{"no To_Account", "", nil, `{"TagList":["Tag_Profile_IM_Nick"]}`, 40002},
		{"empty To_Account", "", nil, `{"To_Account":[],"TagList":["Tag_Profile_IM_Nick"]}`, 40002},
		{"account not a string", "", nil, `{"To_Account":[12],"TagList":["Tag_Profile_IM_Nick"]}`, 60015},
		{"no TagList", "", nil, `{"To_Account":["u1"]}`, 40001},
		{"tag not a string", "", nil, `{"To_Account":["u1"],"TagList":[5]}`, 40001},
		{"null tag", "", nil, `{"To_Account":["u1"],"TagList":[null]}`, 40801},
		{"unknown standard tag", "", nil, `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Bogus"]}`, 40801},
		{"custom tag too long", "", nil, `{"To_Account":["u1"],"TagList":["Tag_Profile_Custom_Abcdefghi"]}`, 40801},
		{"custom tag with digit", "", nil, `{"To_Account":["u1"],"TagList":["Tag_Profile_Custom_A1"]}`, 40801},
		{"too many accounts", "", nil, many, 40001},
		{"body too large", "", nil, `{"To_Account":["` + strings.Repeat("a", 2<<20) + `"]}`, 40001},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := &fakeLookup{}
			h := newHandler(t, l, AuthUserSig)
			q := query()
			if tt.q != nil {
				tt.q(q)
			}
			method := tt.method
			if method == "" {
				method = http.MethodPost
			}
			status, out, raw := do(t, h, method, q, tt.body)
			if status != http.StatusOK || out.ErrorCode != tt.code || out.ActionStatus != "FAIL" || out.ErrorInfo == "" {
				t.Fatalf("status %d, answer %s; want code %d", status, raw, tt.code)
			}
			if strings.Contains(raw, q.Get("usersig")) && q.Get("usersig") != "" {
				t.Fatalf("answer echoes the UserSig: %s", raw)
			}
			if len(l.calls) != 0 {
				t.Fatalf("a caller error reached the lookup: %v", l.calls)
			}
		})
	}
}

func TestAnswersInRequestOrder(t *testing.T) {
	l := &fakeLookup{err: map[string]error{"down": &upstream.Error{Kind: im.KindHTTP, Status: 502}}}
	h := newHandler(t, l, AuthUserSig)
	long := strings.Repeat("x", 33)
	_, out, raw := do(t, h, http.MethodPost, query(),
		`{"To_Account":["u1","ghost","bad\u0001id","`+long+`","down","u1"],"TagList":["Tag_Profile_IM_Level","Tag_Profile_IM_Nick"]}`)
	if out.ActionStatus != "OK" || out.ErrorCode != 0 {
		t.Fatalf("answer %s", raw)
	}
	var got []string
	for _, it := range out.UserProfileItem {
		got = append(got, it.ToAccount)
	}
	if !slices.Equal(got, []string{"u1", "ghost", "bad\x01id", long, "down", "u1"}) {
		t.Fatalf("items %v", got)
	}
	if it := out.UserProfileItem[0]; len(it.ProfileItem) != 2 || it.ProfileItem[0].Tag != "Tag_Profile_IM_Level" {
		t.Fatalf("u1 item %+v", it)
	}
	if !slices.Equal(out.FailAccount, []string{"ghost", "down"}) || !slices.Equal(out.InvalidAccount, []string{"bad\x01id", long}) {
		t.Fatalf("Fail_Account %v Invalid_Account %v", out.FailAccount, out.InvalidAccount)
	}
	if c := out.UserProfileItem[4].ResultCode; c != 40006 {
		t.Fatalf("502 mapped to %d", c)
	}
	if len(l.calls) != 1 || !slices.Equal(l.calls[0], []string{"u1", "ghost", "down", "u1"}) {
		t.Fatalf("lookup saw %v: invalid ids must not reach it", l.calls)
	}
	if !strings.Contains(raw, `"Fail_Account":["ghost","down"]`) || !strings.Contains(raw, `\u0001`) {
		t.Fatalf("encoding: %s", raw)
	}
}

func TestWholeFailureEnvelope(t *testing.T) {
	l := &fakeLookup{err: map[string]error{
		"u1": context.DeadlineExceeded,
		"u2": &upstream.Error{Kind: im.KindThrottled, Code: 60007, Info: "too frequent"},
		"u3": cache.ErrClosed,
	}}
	h := newHandler(t, l, AuthUserSig)
	for _, tc := range []struct {
		account string
		code    int
	}{{"u1", 70169}, {"u2", 60007}, {"u3", 40006}} {
		_, out, raw := do(t, h, http.MethodPost, query(), `{"To_Account":["`+tc.account+`"],"TagList":["Tag_Profile_IM_Nick"]}`)
		if out.ActionStatus != "FAIL" || out.ErrorCode != tc.code || strings.Contains(raw, "UserProfileItem") {
			t.Fatalf("%s: %s", tc.account, raw)
		}
	}
}

func TestAuthNone(t *testing.T) {
	l := &fakeLookup{}
	h := newHandler(t, l, AuthNone)
	_, out, raw := do(t, h, http.MethodPost, url.Values{}, `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`)
	if out.ErrorCode != 0 || len(out.UserProfileItem) != 1 {
		t.Fatalf("%s", raw)
	}
	_, out, _ = do(t, h, http.MethodPost, url.Values{"sdkappid": {"5"}}, `{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`)
	if out.ErrorCode != 60006 {
		t.Fatalf("another app's sdkappid accepted with -auth none: %d", out.ErrorCode)
	}
}

func TestNewValidates(t *testing.T) {
	l := &fakeLookup{}
	for _, cfg := range []Config{{}, {Lookup: l}, {Lookup: l, SDKAppID: 1}, {Lookup: l, SDKAppID: 1, Key: "k", Auth: "maybe"}} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
}

func TestErrorCodeNeverLeaksSig(t *testing.T) {
	sig := usersig.Sign(key, app, "administrator", time.Now(), time.Hour)
	err := &upstream.Error{Kind: im.KindTransport, Err: errors.New("dial tcp: refused")}
	if _, info := ErrorCode(err); strings.Contains(info, sig) || strings.Contains(info, "refused") {
		t.Fatalf("transport detail reaches callers: %q", info)
	}
}

func FuzzPortraitGet(f *testing.F) {
	f.Add(`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`)
	f.Add(`{"To_Account":["u1","u2"],"TagList":["Tag_Profile_Custom_Test","Tag_Profile_IM_Level"]}`)
	f.Add(`{"To_Account":[1],"TagList":[]}`)
	f.Add(`{"To_Account":["\u0000"],"TagList":["Tag_Profile_IM_Nick"]}`)
	f.Add(`[]`)
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Auth: AuthNone})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, body string) {
		req := httptest.NewRequest(http.MethodPost, im.PathGet, strings.NewReader(body))
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var out im.GetResponse
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &out) != nil {
			t.Fatalf("status %d body %q", rec.Code, rec.Body.String())
		}
		if (out.ErrorCode == 0) != (out.ActionStatus == "OK") {
			t.Fatalf("inconsistent envelope %q", rec.Body.String())
		}
	})
}
