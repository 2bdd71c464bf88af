package imsim_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// callOther posts body to path as identifier with a UserSig signed by key
// and returns the decoded answer (nil and the error when none came).
func callOther(t *testing.T, base string, sim *imsim.Server, path, identifier, key, body string) (map[string]any, error) {
	t.Helper()
	q := url.Values{"sdkappid": {fmt.Sprint(sim.SDKAppID())}, "identifier": {identifier}, "random": {"7"}, "contenttype": {"json"},
		"usersig": {usersig.Sign(key, sim.SDKAppID(), identifier, time.Now(), time.Hour)}}
	resp, err := http.Post(base+path+"?"+q.Encode(), "application/json", strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s: %d %q", path, resp.StatusCode, raw)
	}
	return out, nil
}

func code(m map[string]any) int { v, _ := m["ErrorCode"].(float64); return int(v) }

// The account calls change which accounts portrait_get finds, with the
// real answers' shapes; each checks the caller's own UserSig and admin
// rights first, and is recorded.
func TestAccountCalls(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c := client(t, sim, srv.URL)
	admin := sim.Identifier()
	must := func(path, body string) map[string]any {
		t.Helper()
		out, err := callOther(t, srv.URL, sim, path, admin, sim.Key(), body)
		if err != nil || code(out) != 0 {
			t.Fatalf("%s %s: %v %v", path, body, out, err)
		}
		return out
	}
	must(imsim.PathAccountImport, `{"UserID":"alice","Nick":"Alice","FaceUrl":"https://x/a.png"}`)
	must(imsim.PathAccountImport, `{"Identifier":"bob"}`) // the older field
	out := must(imsim.PathMultiAccountImport, `{"Accounts":["carol","`+strings.Repeat("z", 33)+`"]}`)
	if fails, _ := out["FailAccounts"].([]any); len(fails) != 1 {
		t.Fatalf("FailAccounts %v", out["FailAccounts"])
	}
	must(imsim.PathMultiAccountImport, `{"AccountList":[{"UserID":"dave","Nick":"Dave"}]}`)
	resp, err := get(c, "alice", "bob", "carol", "dave")
	if err != nil {
		t.Fatal(err)
	}
	for _, it := range resp.UserProfileItem {
		if it.ResultCode != 0 {
			t.Fatalf("%s not imported: %+v", it.ToAccount, it)
		}
	}
	if v, _ := sim.Value("alice", "Tag_Profile_IM_Image"); string(v) != `"https://x/a.png"` {
		t.Fatalf("alice's face %s", v)
	}
	out = must(imsim.PathAccountDelete, `{"DeleteItem":[{"UserID":"alice"},{"UserID":"user3"},{"UserID":"nobody"}]}`)
	items, _ := out["ResultItem"].([]any)
	if len(items) != 3 {
		t.Fatalf("ResultItem %v", out)
	}
	for i, want := range []int{0, 0, im.CodeNotImported} {
		if got := int(items[i].(map[string]any)["ResultCode"].(float64)); got != want {
			t.Fatalf("item %d: %d, want %d", i, got, want)
		}
	}
	resp, _ = get(c, "alice", "user3", "user4")
	for i, want := range []int{im.CodeAccountNotFound, im.CodeAccountNotFound, 0} {
		if resp.UserProfileItem[i].ResultCode != want {
			t.Fatalf("%+v", resp.UserProfileItem[i])
		}
	}
	// A forged UserSig and a non-admin change nothing.
	for _, who := range []struct{ id, key string }{{admin, "wrong-key"}, {"user4", sim.Key()}} {
		out, err := callOther(t, srv.URL, sim, imsim.PathAccountDelete, who.id, who.key, `{"DeleteItem":[{"UserID":"user4"}]}`)
		if err != nil || code(out) == 0 {
			t.Fatalf("%s: %v %v", who.id, out, err)
		}
	}
	if !sim.Exists("user4") || sim.Stats().AuthFailures != 2 {
		t.Fatalf("refused deletions: exists %v, %+v", sim.Exists("user4"), sim.Stats())
	}
	seen := sim.Seen()
	if len(seen) != 7 || seen[0].Path != imsim.PathAccountImport || seen[0].Identifier != admin || !strings.Contains(string(seen[0].Body), "Alice") {
		t.Fatalf("seen %d: %+v", len(seen), seen[0])
	}
}

// Other APIs get a generic OK, within a quota of their own each; Drop
// closes the connection without an answer.
func TestOtherAPIs(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{APIQuota: 2}})
	for i, want := range []int{0, 0, im.CodeFreqLimit} {
		out, err := callOther(t, srv.URL, sim, "/v4/openim/sendmsg", sim.Identifier(), sim.Key(), `{}`)
		if err != nil || code(out) != want {
			t.Fatalf("call %d: %v %v", i, out, err)
		}
	}
	if out, _ := callOther(t, srv.URL, sim, "/v4/sns/friend_add", sim.Identifier(), sim.Key(), `{}`); code(out) != 0 {
		t.Fatalf("another API shares sendmsg's quota: %v", out)
	}
	sim.SetFaults(imsim.Faults{Drop: 1})
	if _, err := callOther(t, srv.URL, sim, "/v4/sns/friend_get", sim.Identifier(), sim.Key(), `{}`); err == nil {
		t.Fatal("a dropped call was answered")
	}
	if st := sim.Stats(); st.Other != 5 || st.OtherThrottled != 1 || st.Dropped != 1 {
		t.Fatalf("stats %+v", st)
	}
	if seen := sim.Seen(); seen[4].Status != 0 || seen[2].Status != 200 {
		t.Fatalf("seen %+v", seen)
	}
}
