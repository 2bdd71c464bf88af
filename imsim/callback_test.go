package imsim_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

type received struct {
	query url.Values
	ev    imsim.CallbackEvent
}

// TestChangeCallbacks: every change (through portrait_set or a client) is
// announced to the callback URL with the documented query and body, signed
// when a token is set, with strictly increasing EventTimes; Duplicate
// delivers each twice.
func TestChangeCallbacks(t *testing.T) {
	var mu sync.Mutex
	var got []received
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev imsim.CallbackEvent
		b, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(b, &ev); err != nil {
			t.Errorf("callback body %s: %v", b, err)
		}
		mu.Lock()
		got = append(got, received{r.URL.Query(), ev})
		mu.Unlock()
		w.Write([]byte(`{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}`))
	}))
	defer recv.Close()
	sim, srv := simtest.Start(t, imsim.Config{Callback: imsim.Callback{URL: recv.URL + "/cb", Token: "tok", Duplicate: 1}})
	defer sim.Close()
	c := client(t, sim, srv.URL)
	if err := c.PortraitSet(context.Background(), im.SetRequest{FromAccount: "user1",
		ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"a"`)}}}); err != nil {
		t.Fatal(err)
	}
	if err := sim.ClientSet("user1", []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"b"`)}}); err != nil {
		t.Fatal(err)
	}
	if err := sim.ClientSet("nobody", nil); err == nil {
		t.Fatal("ClientSet on a missing account accepted")
	}
	wait.For(t, 5*time.Second, "4 callbacks sent", func() bool { return sim.Stats().CallbacksSent >= 4 })
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 4 {
		t.Fatalf("%d callbacks, want 4 (two changes, each twice)", len(got))
	}
	events := map[int64]string{}
	for _, r := range got {
		q := r.query
		if q.Get("SdkAppid") != "1400000000" || q.Get("CallbackCommand") != "Profile.CallbackPortraitSet" || q.Get("contenttype") != "json" {
			t.Fatalf("query %v", q)
		}
		sum := sha256.Sum256([]byte("tok" + q.Get("RequestTime")))
		if q.Get("Sign") != hex.EncodeToString(sum[:]) {
			t.Fatalf("Sign %q does not match", q.Get("Sign"))
		}
		ev := r.ev
		if ev.CallbackCommand != "Profile.CallbackPortraitSet" || ev.FromAccount != "user1" || ev.EventTime <= 0 || len(ev.ProfileItem) != 1 {
			t.Fatalf("event %+v", ev)
		}
		events[ev.EventTime] = string(ev.ProfileItem[0].Value) + "/" + ev.OperatorAccount + "/" + q.Get("OptPlatform")
	}
	if len(events) != 2 {
		t.Fatalf("event times %v: want two distinct", events)
	}
	var first, second int64
	for e := range events {
		if first == 0 || e < first {
			first = e
		}
		second = max(second, e)
	}
	if events[first] != `"a"/administrator/RESTAPI` || events[second] != `"b"/user1/iOS` {
		t.Fatalf("events %v", events)
	}
}

// TestSetQuota: portrait_set has its own sliding-second quota.
func TestSetQuota(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{SetQuota: 5}})
	c := client(t, sim, srv.URL)
	throttled := 0
	for range 8 {
		err := c.PortraitSet(context.Background(), im.SetRequest{FromAccount: "user1",
			ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"x"`)}}})
		if upstream.KindOf(err) == im.KindThrottled {
			throttled++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	if st := sim.Stats(); st.Sets != 5 || st.SetThrottled != 3 || throttled != 3 {
		t.Fatalf("sets %d, throttled %d (client saw %d); want 5 and 3", st.Sets, st.SetThrottled, throttled)
	}
}
