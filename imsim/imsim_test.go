package imsim_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

func client(t *testing.T, sim *imsim.Server, base string) *upstream.Client {
	t.Helper()
	c, err := upstream.New(upstream.Config{BaseURL: base, Signer: simtest.Signer(sim, sim.Key())})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func get(c *upstream.Client, accounts ...string) (*im.GetResponse, error) {
	return c.PortraitGet(context.Background(), im.GetRequest{ToAccount: accounts, TagList: []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_SelfSignature"}})
}

// TestSlidingWindowIsExact fires calls faster than the quota from several
// goroutines and checks the log both ways: no sliding second holds more
// accepted calls than the quota, and no call was throttled while its second
// had room.
func TestSlidingWindowIsExact(t *testing.T) {
	const quota = 20
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota, ThrottleCode: 60018}})
	c := client(t, sim, srv.URL)
	deadline := time.Now().Add(1500 * time.Millisecond)
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	for range 6 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				_, err := get(c, "user1")
				code := 0
				if e, ok := err.(*upstream.Error); ok {
					code = e.Code
				} else if err != nil {
					t.Errorf("unexpected error %v", err)
					return
				}
				mu.Lock()
				codes[code]++
				mu.Unlock()
				time.Sleep(2 * time.Millisecond) // each caller's pace over real HTTP
			}
		})
	}
	wg.Wait()
	log := sim.Log()
	var accepted []time.Time
	for _, call := range log {
		// Accepted calls in (call.At-1s, call.At) before this one.
		n := 0
		for _, a := range accepted {
			if call.At.Sub(a) < time.Second {
				n++
			}
		}
		if call.Accepted {
			if n+1 > quota {
				t.Fatalf("call at %v accepted with %d already in its second", call.At, n)
			}
			accepted = append(accepted, call.At)
		} else if n < quota {
			t.Fatalf("call at %v throttled with only %d in its second", call.At, n)
		}
	}
	st := sim.Stats()
	if codes[0] != int(st.Accepted) || codes[60018] != int(st.Throttled) || len(codes) != 2 {
		t.Fatalf("client saw %v, emulator %+v", codes, st)
	}
	if st.Throttled == 0 || st.Accepted < 2*quota || st.MaxAcceptPerSec != quota {
		t.Fatalf("load did not exercise the window: %+v", st)
	}
	t.Logf("%d calls: %d accepted, %d throttled, max %d accepted in a sliding second", len(log), st.Accepted, st.Throttled, st.MaxAcceptPerSec)
}

func rawCall(t *testing.T, base string, query url.Values, body string) im.GetResponse {
	t.Helper()
	resp, err := http.Post(base+im.PathGet+"?"+query.Encode(), "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out im.GetResponse
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestQueryAndSigChecks(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	good := func() url.Values {
		return url.Values{"sdkappid": {"1400000000"}, "identifier": {"administrator"}, "random": {"7"}, "contenttype": {"json"},
			"usersig": {usersig.Sign(sim.Key(), sim.SDKAppID(), "administrator", time.Now(), time.Hour)}}
	}
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`
	tests := []struct {
		name   string
		change func(url.Values)
		body   string
		code   int
	}{
		{"valid", func(url.Values) {}, body, 0},
		{"no sdkappid", func(q url.Values) { q.Del("sdkappid") }, body, 60012},
		{"other sdkappid", func(q url.Values) { q.Set("sdkappid", "1400000001") }, body, 60006},
		{"no usersig", func(q url.Values) { q.Del("usersig") }, body, 70002},
		{"garbage usersig", func(q url.Values) { q.Set("usersig", "abc") }, body, 70003},
		{"expired usersig", func(q url.Values) {
			q.Set("usersig", usersig.Sign(sim.Key(), sim.SDKAppID(), "administrator", time.Now().Add(-2*time.Hour), time.Hour))
		}, body, 70001},
		{"wrong key", func(q url.Values) {
			q.Set("usersig", usersig.Sign("x", sim.SDKAppID(), "administrator", time.Now(), time.Hour))
		}, body, 70009},
		{"identifier differs from sig", func(q url.Values) { q.Set("identifier", "bob") }, body, 70013},
		{"not admin", func(q url.Values) {
			q.Set("identifier", "bob")
			q.Set("usersig", usersig.Sign(sim.Key(), sim.SDKAppID(), "bob", time.Now(), time.Hour))
		}, body, 40004},
		{"no random", func(q url.Values) { q.Del("random") }, body, 60002},
		{"bad json", func(url.Values) {}, `{"To_Account":`, 60003},
		{"account not a string", func(url.Values) {}, `{"To_Account":[1],"TagList":["Tag_Profile_IM_Nick"]}`, 60015},
		{"no accounts", func(url.Values) {}, `{"TagList":["Tag_Profile_IM_Nick"]}`, 40002},
		{"no tags", func(url.Values) {}, `{"To_Account":["user1"]}`, 40001},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := good()
			tt.change(q)
			out := rawCall(t, srv.URL, q, tt.body)
			if out.ErrorCode != tt.code {
				t.Fatalf("ErrorCode = %d (%s), want %d", out.ErrorCode, out.ErrorInfo, tt.code)
			}
			if (out.ActionStatus == "OK") != (tt.code == 0) {
				t.Fatalf("ActionStatus %s with code %d", out.ActionStatus, out.ErrorCode)
			}
		})
	}
	if st := sim.Stats(); st.AuthFailures != 9 {
		t.Errorf("auth failures = %d, want 9", st.AuthFailures)
	}
}

func TestUnsetTagBehaviours(t *testing.T) {
	// Find a sparse account: it leaves SelfSignature unset.
	sparse := ""
	for i := 0; sparse == ""; i++ {
		if imsim.Sparse(imsim.AccountName(i)) {
			sparse = imsim.AccountName(i)
		}
	}
	sim, srv := simtest.Start(t, imsim.Config{})
	c := client(t, sim, srv.URL)
	resp, err := get(c, sparse)
	if err != nil {
		t.Fatal(err)
	}
	if items := resp.UserProfileItem[0].ProfileItem; len(items) != 1 || items[0].Tag != "Tag_Profile_IM_Nick" {
		t.Fatalf("omit: items %+v", items)
	}
	sim.SetBehaviour(imsim.Behaviour{UnsetAsEmpty: true})
	resp, err = get(c, sparse)
	if err != nil {
		t.Fatal(err)
	}
	if items := resp.UserProfileItem[0].ProfileItem; len(items) != 2 || string(items[1].Value) != `""` {
		t.Fatalf("empty: items %+v", items)
	}
}

func TestFaults(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Faults: imsim.Faults{Latency: 30 * time.Millisecond}})
	c := client(t, sim, srv.URL)
	begin := time.Now()
	if _, err := get(c, "user1"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(begin); d < 30*time.Millisecond {
		t.Fatalf("answered in %v despite 30ms latency", d)
	}
	sim.SetFaults(imsim.Faults{Timeout: 1, TimeoutAfter: 50 * time.Millisecond})
	if _, err := get(c, "user1"); upstream.KindOf(err) != im.KindHTTP {
		t.Fatalf("timeout fault: %v", err)
	}
	if st := sim.Stats(); st.Timeouts != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestAdminEndpoints(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c := client(t, sim, srv.URL)
	if _, err := get(c, "user1", "user2", "user1"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(srv.URL+"/imsim/config", "application/json", bytes.NewReader([]byte(`{"behaviour":{"quota":-1},"faults":{"fail_502":1}}`)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, err := get(c, "user1"); upstream.KindOf(err) != im.KindHTTP {
		t.Fatalf("after config: %v", err)
	}
	resp, err = http.Get(srv.URL + "/imsim/stats")
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var st struct {
		imsim.Stats
		AccountsPerCall float64 `json:"accounts_per_call"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatal(err)
	}
	if st.Calls != 2 || st.Served != 1 || st.Accounts != 3 || st.DistinctFetched != 2 || st.Fail502 != 1 || st.AccountsPerCall != 3 {
		t.Fatalf("stats %s", raw)
	}
	if n := sim.FetchCount("user1"); n != 2 {
		t.Fatalf("user1 fetched %d times", n)
	}
	resp, _ = http.Post(srv.URL+"/imsim/reset", "", nil)
	resp.Body.Close()
	if st := sim.Stats(); st.Calls != 0 || len(sim.Log()) != 0 {
		t.Fatalf("after reset: %+v", st)
	}
}

// TestTagListLimitAndRepeats: the emulator refuses a TagList longer than
// im.MaxTagsPerCall with 40001 and answers a repeated tag once.
func TestTagListLimitAndRepeats(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c := client(t, sim, srv.URL)
	long := make([]string, im.MaxTagsPerCall+1)
	for i := range long {
		long[i] = "Tag_Profile_IM_Nick"
	}
	_, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: long})
	var ue *upstream.Error
	if !errors.As(err, &ue) || ue.Code != im.CodeBadRequest {
		t.Fatalf("long TagList: %v", err)
	}
	resp, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1", "user1"}, TagList: long[1:]})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.UserProfileItem) != 2 || len(resp.UserProfileItem[0].ProfileItem) != 1 {
		t.Fatalf("answer %+v: one item per mention of the account, each tag once", resp.UserProfileItem)
	}
}

// TestRefusalsAndNoData plays the cases the proxy isolates: an unconfigured
// custom tag refuses the whole call (40009) and so does an unreadable one
// (40007), naming the tag; an account the upstream cannot read refuses the
// whole call (40001) naming the account; accounts without standard or custom
// data fail only their item, by the class of tags asked (40807 / 40809).
func TestRefusalsAndNoData(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{
		CustomTags:     []string{"Tag_Profile_Custom_Test", "Tag_Profile_Custom_Secret"},
		UnreadableTags: []string{"Tag_Profile_Custom_Secret"},
		NoStandardData: []string{"nostd"}, NoCustomData: []string{"nocustom"},
		RejectAccounts: []string{"bad.id"},
	}})
	c := client(t, sim, srv.URL)
	call := func(accounts []string, tags ...string) (*im.GetResponse, int, string) {
		t.Helper()
		resp, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: accounts, TagList: tags})
		var ue *upstream.Error
		if errors.As(err, &ue) {
			return nil, ue.Code, ue.Info
		}
		if err != nil {
			t.Fatal(err)
		}
		return resp, 0, ""
	}
	for _, tc := range []struct {
		name     string
		accounts []string
		tags     []string
		code     int
		names    string
	}{
		{"unconfigured custom tag", []string{"user1", "user2"}, []string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Nope"}, 40009, "Tag_Profile_Custom_Nope"},
		{"unreadable tag", []string{"user1"}, []string{"Tag_Profile_Custom_Secret"}, 40007, "Tag_Profile_Custom_Secret"},
		{"rejected account", []string{"user1", "bad.id"}, []string{"Tag_Profile_IM_Nick"}, 40001, "bad.id"},
	} {
		if _, code, info := call(tc.accounts, tc.tags...); code != tc.code || !strings.Contains(info, tc.names) {
			t.Errorf("%s: code %d info %q, want %d naming %s", tc.name, code, info, tc.code, tc.names)
		}
	}
	resp, _, _ := call([]string{"nostd", "nocustom", "user1"}, "Tag_Profile_IM_Nick", "Tag_Profile_Custom_Test")
	codes := []int{resp.UserProfileItem[0].ResultCode, resp.UserProfileItem[1].ResultCode, resp.UserProfileItem[2].ResultCode}
	if codes[0] != 40807 || codes[1] != 40809 || codes[2] != 0 {
		t.Fatalf("mixed tags: item codes %v, want [40807 40809 0]", codes)
	}
	resp, _, _ = call([]string{"nostd", "nocustom"}, "Tag_Profile_Custom_Test")
	if it := resp.UserProfileItem[0]; it.ResultCode != 0 || len(it.ProfileItem) != 1 {
		t.Fatalf("custom tags of an account without standard data: %+v", it)
	}
	if it := resp.UserProfileItem[1]; it.ResultCode != 40809 {
		t.Fatalf("custom tags of an account without custom data: %+v", it)
	}
	resp, _, _ = call([]string{"nocustom"}, "Tag_Profile_IM_Nick")
	if it := resp.UserProfileItem[0]; it.ResultCode != 0 || len(it.ProfileItem) != 1 {
		t.Fatalf("standard tags of an account without custom data: %+v", it)
	}
}
