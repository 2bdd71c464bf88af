package upstream_test

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
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

func newClient(t *testing.T, sim *imsim.Server, base string, key string) (*upstream.Client, *usersig.Signer) {
	t.Helper()
	signer := simtest.Signer(sim, key)
	c, err := upstream.New(upstream.Config{BaseURL: base, Signer: signer, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return c, signer
}

func accounts(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = imsim.AccountName(i)
	}
	return out
}

func TestPortraitGetHundredAccounts(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c, _ := newClient(t, sim, srv.URL, sim.Key())
	accs := accounts(100)
	tags := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_Custom_Test"}
	resp, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: accs, TagList: tags})
	if err != nil {
		t.Fatal(err)
	}
	if resp.ActionStatus != "OK" || len(resp.UserProfileItem) != 100 || len(resp.FailAccount) != 0 {
		t.Fatalf("status %s, %d items, fail %v", resp.ActionStatus, len(resp.UserProfileItem), resp.FailAccount)
	}
	for i, item := range resp.UserProfileItem {
		if item.ToAccount != accs[i] || item.ResultCode != 0 {
			t.Fatalf("item %d = %s/%d", i, item.ToAccount, item.ResultCode)
		}
		for _, pi := range item.ProfileItem {
			want, ok := imsim.SeededValue(item.ToAccount, pi.Tag)
			if !ok || string(pi.Value) != string(want) {
				t.Errorf("%s %s = %s, want %s", item.ToAccount, pi.Tag, pi.Value, want)
			}
		}
		wantN := 3
		if imsim.Sparse(item.ToAccount) {
			wantN = 2 // the custom tag is unset and omitted
		}
		if len(item.ProfileItem) != wantN {
			t.Errorf("%s has %d items, want %d", item.ToAccount, len(item.ProfileItem), wantN)
		}
	}
	if st := sim.Stats(); st.Served != 1 || st.MaxAccounts != 100 || st.Accounts != 100 {
		t.Errorf("emulator saw %+v", st)
	}
}

func TestPortraitGetKeepsUint64Exact(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c, _ := newClient(t, sim, srv.URL, sim.Key())
	sim.Put("user1", "Tag_Profile_IM_Level", json.RawMessage("18446744073709551615"))
	sim.Put("user1", "Tag_Profile_IM_Nick", json.RawMessage(`"12345678901234567890"`))
	resp, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: []string{"Tag_Profile_IM_Level", "Tag_Profile_IM_Nick"}})
	if err != nil {
		t.Fatal(err)
	}
	got := resp.UserProfileItem[0].ProfileItem
	if string(got[0].Value) != "18446744073709551615" || string(got[1].Value) != `"12345678901234567890"` {
		t.Fatalf("values %s %s", got[0].Value, got[1].Value)
	}
}

func TestPortraitGetErrorClasses(t *testing.T) {
	tests := []struct {
		name     string
		cfg      imsim.Config
		key      string // signing key; empty means the emulator's
		accounts []string
		tags     []string
		kind     im.Kind
		code     int
		status   int
	}{
		{name: "101 accounts refused", accounts: accounts(101), kind: im.KindRejected, code: 40001},
		{name: "no accounts", accounts: []string{}, kind: im.KindRejected, code: 40002},
		{name: "unknown tag", accounts: accounts(1), tags: []string{"Tag_Profile_Custom_Nope"}, kind: im.KindRejected, code: 40009},
		{name: "invalid tag name", accounts: accounts(1), tags: []string{"Tag_Bogus"}, kind: im.KindRejected, code: 40801},
		{name: "wrong key", key: "not-the-key", accounts: accounts(1), kind: im.KindAuth, code: 70009},
		{name: "http 502", cfg: imsim.Config{Faults: imsim.Faults{Fail502: 1}}, accounts: accounts(1), kind: im.KindHTTP, status: 502},
		{name: "whole-call 40003", cfg: imsim.Config{Behaviour: imsim.Behaviour{MissingFailsCall: true}}, accounts: []string{"user1", "nobody"}, kind: im.KindNotFound, code: 40003},
		{name: "whole-call internal", cfg: imsim.Config{Faults: imsim.Faults{CallErrorCode: 40006}}, accounts: accounts(1), kind: im.KindTransient, code: 40006},
		{name: "throttle code", cfg: imsim.Config{Faults: imsim.Faults{CallErrorCode: 60011}}, accounts: accounts(1), kind: im.KindThrottled, code: 60011},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sim, srv := simtest.Start(t, tt.cfg)
			key := tt.key
			if key == "" {
				key = sim.Key()
			}
			c, signer := newClient(t, sim, srv.URL, key)
			tags := tt.tags
			if tags == nil {
				tags = []string{"Tag_Profile_IM_Nick"}
			}
			_, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: tt.accounts, TagList: tags})
			var ue *upstream.Error
			if !errors.As(err, &ue) {
				t.Fatalf("err = %v, want *upstream.Error", err)
			}
			if ue.Kind != tt.kind || ue.Code != tt.code || ue.Status != tt.status {
				t.Fatalf("got kind %s code %d status %d, want %s %d %d", ue.Kind, ue.Code, ue.Status, tt.kind, tt.code, tt.status)
			}
			if strings.Contains(err.Error(), signer.Sig()) {
				t.Fatalf("error text holds the UserSig: %v", err)
			}
		})
	}
}

func TestPortraitGetPerAccountFailure(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c, _ := newClient(t, sim, srv.URL, sim.Key())
	resp, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1", "ghost", "user2"}, TagList: []string{"Tag_Profile_IM_Nick"}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(resp.FailAccount, []string{"ghost"}) {
		t.Fatalf("Fail_Account = %v", resp.FailAccount)
	}
	if it := resp.UserProfileItem[1]; it.ResultCode != 40003 || im.Classify(it.ResultCode) != im.KindNotFound {
		t.Fatalf("ghost item = %+v", it)
	}
	sim.SetFaults(imsim.Faults{ItemInternal: 1})
	resp, err = c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: []string{"Tag_Profile_IM_Nick"}})
	if err != nil {
		t.Fatal(err)
	}
	if it := resp.UserProfileItem[0]; it.ResultCode != 40006 || im.Classify(it.ResultCode) != im.KindTransient || len(resp.FailAccount) != 1 {
		t.Fatalf("item = %+v, fail %v", it, resp.FailAccount)
	}
}

func TestPortraitGetThrottledAfterQuota(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: 5}})
	c, _ := newClient(t, sim, srv.URL, sim.Key())
	var ok, throttled int
	for range 12 {
		_, err := c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: []string{"Tag_Profile_IM_Nick"}})
		switch k := upstream.KindOf(err); k {
		case im.KindOK:
			ok++
		case im.KindThrottled:
			throttled++
		default:
			t.Fatalf("unexpected %v", err)
		}
	}
	// Twelve calls in well under a second: the first five pass.
	if ok != 5 || throttled != 7 {
		t.Fatalf("ok %d throttled %d, want 5 and 7", ok, throttled)
	}
	if st := sim.Stats(); st.Throttled != 7 || st.Accepted != 5 {
		t.Fatalf("emulator stats %+v", st)
	}
}

// TestTransportErrorsAreRedacted makes Go's HTTP stack fail with the URL in
// its error (a refused connection and a timeout) and checks that the
// UserSig is not in the text.
func TestTransportErrorsAreRedacted(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + ln.Addr().String()
	ln.Close()

	block := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	defer close(block)

	sim := imsim.New(imsim.Config{})
	for _, base := range []string{closed, slow.URL} {
		signer := simtest.Signer(sim, sim.Key())
		c, err := upstream.New(upstream.Config{BaseURL: base, Signer: signer, Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: []string{"Tag_Profile_IM_Nick"}})
		if upstream.KindOf(err) != im.KindTransport {
			t.Fatalf("%s: err = %v, want transport", base, err)
		}
		msg := err.Error()
		if strings.Contains(msg, signer.Sig()) || !strings.Contains(msg, "usersig=REDACTED") {
			t.Fatalf("error not redacted: %s", msg)
		}
		if base == slow.URL && !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("timeout error does not wrap DeadlineExceeded: %v", err)
		}
	}
}

func TestObserveCountsEveryCall(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: 3}})
	signer := simtest.Signer(sim, sim.Key())
	var mu sync.Mutex
	kinds := map[im.Kind]int{}
	c, err := upstream.New(upstream.Config{BaseURL: srv.URL, Signer: signer, Observe: func(k im.Kind, d time.Duration, _ error) {
		mu.Lock()
		kinds[k]++
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		c.PortraitGet(context.Background(), im.GetRequest{ToAccount: []string{"user1"}, TagList: []string{"Tag_Profile_IM_Nick"}})
	}
	if kinds[im.KindOK] != 3 || kinds[im.KindThrottled] != 2 || int64(len(kinds)) != 2 {
		t.Fatalf("observed %v", kinds)
	}
	if st := sim.Stats(); st.Calls != 5 {
		t.Fatalf("emulator saw %d calls", st.Calls)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	signer := usersig.NewSigner("k", 1, "a", 0, nil)
	for _, base := range []string{"", "console.tim.qq.com", "ftp://x", "http://"} {
		if _, err := upstream.New(upstream.Config{BaseURL: base, Signer: signer}); err == nil {
			t.Errorf("New accepted base URL %q", base)
		}
	}
	if _, err := upstream.New(upstream.Config{BaseURL: "https://console.tim.qq.com"}); err == nil {
		t.Error("New accepted a nil Signer")
	}
}

func TestPortraitSet(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	c, _ := newClient(t, sim, srv.URL, sim.Key())
	err := c.PortraitSet(context.Background(), im.SetRequest{FromAccount: "user3", ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"changed"`)}}})
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := sim.Value("user3", "Tag_Profile_IM_Nick"); string(v) != `"changed"` {
		t.Fatalf("value %s", v)
	}
	err = c.PortraitSet(context.Background(), im.SetRequest{FromAccount: "ghost", ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"x"`)}}})
	if upstream.KindOf(err) != im.KindNotFound {
		t.Fatalf("set on ghost: %v", err)
	}
}
