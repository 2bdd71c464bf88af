package proxy_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

const nickTag = "Tag_Profile_IM_Nick"

// set sends a portrait_set through r and returns the envelope.
func (r *rig) set(t *testing.T, account string, items ...im.ProfileItem) im.Envelope {
	t.Helper()
	body, _ := json.Marshal(im.SetRequest{FromAccount: account, ProfileItem: items})
	resp, err := r.httpc.Post(strings.Replace(r.url, im.PathGet, im.PathSet, 1), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e im.Envelope
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("portrait_set: HTTP %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	return e
}

func nickItem(v string) im.ProfileItem {
	b, _ := json.Marshal(v)
	return im.ProfileItem{Tag: nickTag, Value: b}
}

// nickOn reads account's nickname through r.
func nickOn(t *testing.T, r *rig, account string) string {
	t.Helper()
	out := r.get(t, []string{account}, nickTag)
	if out.ErrorCode != 0 || len(out.UserProfileItem) != 1 || len(out.UserProfileItem[0].ProfileItem) != 1 {
		t.Fatalf("lookup of %s: %+v", account, out)
	}
	var s string
	json.Unmarshal(out.UserProfileItem[0].ProfileItem[0].Value, &s)
	return s
}

// waitNick reads through r until it serves want, and returns how long
// after from that was (as fine as wait.For's polls). Bound is generous: it
// only catches a change that never arrives; the figure itself is logged
// and measured in make bench.
func waitNick(t *testing.T, r *rig, account, want string, from time.Time) time.Duration {
	t.Helper()
	var d time.Duration
	wait.For(t, time.Until(from.Add(2*time.Second)), fmt.Sprintf("%s to serve %q for %s", r.p.Addr(), want, account), func() bool {
		ok := nickOn(t, r, account) == want
		d = time.Since(from)
		return ok
	})
	return d
}

func threeReplicas(t *testing.T, rs redisSetup, sim *imsim.Server, simURL string, cfg proxy.Config) []*rig {
	cfg.Redis = rs.spec
	var rigs []*rig
	for range 3 {
		rigs = append(rigs, startProxy(t, sim, simURL, cfg))
	}
	return rigs
}

func seededNick(account string) string {
	v, _ := imsim.SeededValue(account, nickTag)
	var s string
	json.Unmarshal(v, &s)
	return s
}

// A portrait_set through replica A is served by A at once and by B and C
// (whose in-process tiers held the old value) as soon as the change feed
// reaches them, without fetching the account again.
func TestSetThroughOneReplicaSeenByAll(t *testing.T) {
	for name, setup := range map[string]func(*testing.T) redisSetup{"single": singleRedis, "cluster": clusterRedis} {
		t.Run(name, func(t *testing.T) {
			sim, srv := simtest.Start(t, imsim.Config{})
			rigs := threeReplicas(t, setup(t), sim, srv.URL, proxy.Config{})
			const acc = "user7"
			for _, r := range rigs {
				if got := nickOn(t, r, acc); got != seededNick(acc) {
					t.Fatalf("warm-up read %q", got)
				}
			}
			fetched := sim.FetchCount(acc)
			if e := rigs[0].set(t, acc, nickItem("set through A")); e.ErrorCode != 0 || e.ActionStatus != "OK" {
				t.Fatalf("portrait_set: %+v", e)
			}
			answered := time.Now()
			if got := nickOn(t, rigs[0], acc); got != "set through A" {
				t.Fatalf("A serves %q right after its own set", got)
			}
			for i, r := range rigs[1:] {
				d := waitNick(t, r, acc, "set through A", answered)
				t.Logf("replica %c served the change %v after the set was answered", 'B'+i, d)
			}
			if n := sim.FetchCount(acc); n != fetched {
				t.Fatalf("the account was fetched %d more times: replicas refetched instead of hearing of the change", n-fetched)
			}
			if v, _ := sim.Value(acc, nickTag); string(v) != `"set through A"` {
				t.Fatalf("the upstream holds %s", v)
			}
			applied := rigs[1].p.Metrics().Changes.WithLabelValues(metrics.ChangeFeed, metrics.ChangeApplied)
			// counted just after it is applied
			wait.For(t, 5*time.Second, "B to count the feed change", func() bool { return testutil.ToFloat64(applied) != 0 })
			if n := testutil.ToFloat64(applied); n != 1 {
				t.Fatalf("B applied %v feed changes", n)
			}
		})
	}
}

// A change made by a client (not through the proxy) reaches the app only
// as the upstream's callback, here delivered (signed) to replica C: A and B
// serve it too.
func TestCallbackToOneReplicaUpdatesAll(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	t.Cleanup(sim.Close)
	rigs := threeReplicas(t, singleRedis(t), sim, srv.URL, proxy.Config{CallbackToken: "cb-token"})
	sim.SetCallback(imsim.Callback{URL: "http://" + rigs[2].p.Addr() + "/im/callback", Token: "cb-token"})
	const acc = "user8"
	for _, r := range rigs {
		nickOn(t, r, acc)
	}
	if err := sim.ClientSet(acc, []im.ProfileItem{nickItem("from a client")}); err != nil {
		t.Fatal(err)
	}
	changed := time.Now()
	for i, r := range rigs {
		d := waitNick(t, r, acc, "from a client", changed)
		t.Logf("replica %c served the client's change %v after it was made", 'A'+i, d)
	}
	// The other replicas can serve the change before C has answered the
	// callback (the feed is sent first): wait for the emulator to have C's
	// answer, which C gives after counting the callback.
	wait.For(t, 5*time.Second, "the emulator to get C's answer", func() bool {
		st := sim.Stats()
		return st.CallbacksSent+st.CallbackErrors != 0
	})
	if st := sim.Stats(); st.CallbacksSent != 1 || st.CallbackErrors != 0 {
		t.Fatalf("emulator: %d callbacks sent, %d failed", st.CallbacksSent, st.CallbackErrors)
	}
	if n := testutil.ToFloat64(rigs[2].p.Metrics().Callbacks.WithLabelValues("ok")); n != 1 {
		t.Fatalf("C received %v callbacks", n)
	}
	// A callback with a wrong signature changes nothing.
	sim.SetCallback(imsim.Callback{URL: "http://" + rigs[2].p.Addr() + "/im/callback", Token: "wrong"})
	sim.ClientSet(acc, []im.ProfileItem{nickItem("forged")})
	wait.For(t, 5*time.Second, "the badly signed callback to be refused", func() bool { return sim.Stats().CallbackErrors != 0 })
	for _, r := range rigs {
		if got := nickOn(t, r, acc); got != "from a client" {
			t.Fatalf("a badly signed callback changed the value to %q", got)
		}
	}
}

// Callbacks delivered late, twice and out of order leave every replica
// (and the shared tier a new replica reads) with the newest value.
func TestCallbacksDuplicatedAndReordered(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	t.Cleanup(sim.Close)
	rs := singleRedis(t)
	rigs := threeReplicas(t, rs, sim, srv.URL, proxy.Config{CallbackToken: "tok"})
	sim.SetCallback(imsim.Callback{URL: "http://" + rigs[2].p.Addr() + "/im/callback", Token: "tok", Jitter: 60 * time.Millisecond, Duplicate: 1})
	const acc, changes = "user9", 12
	for _, r := range rigs {
		nickOn(t, r, acc)
	}
	var last string
	for i := range changes {
		last = "v" + string(rune('a'+i))
		if err := sim.ClientSet(acc, []im.ProfileItem{nickItem(last)}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // a millisecond apart: EventTimes stay on the emulator's clock instead of running ahead of it
	}
	wait.For(t, 5*time.Second, fmt.Sprintf("%d callbacks delivered", 2*changes), func() bool { return sim.Stats().CallbacksSent >= 2*changes })
	// The feed reaches A and B just after C has answered the last callback.
	delivered := time.Now()
	for i, r := range rigs {
		d := waitNick(t, r, acc, last, delivered)
		t.Logf("replica %c served the newest value %v after the last callback was delivered", 'A'+i, d)
	}
	fresh := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	if got := nickOn(t, fresh, acc); got != last {
		t.Fatalf("the shared tier holds %q, want %q", got, last)
	}
	// An exact repeat is caught by the replay memo; a late one by the
	// versions.
	old := testutil.ToFloat64(rigs[2].p.Metrics().Changes.WithLabelValues(metrics.ChangeCallback, metrics.ChangeOld))
	repeat := testutil.ToFloat64(rigs[2].p.Metrics().Callbacks.WithLabelValues("repeat"))
	if old+repeat < changes {
		t.Fatalf("only %v+%v of %d repeated callbacks were recognised as old", old, repeat, 2*changes)
	}
	t.Logf("%d callbacks: %v applied, %v recognised as old, %v as repeats", 2*changes,
		testutil.ToFloat64(rigs[2].p.Metrics().Changes.WithLabelValues(metrics.ChangeCallback, metrics.ChangeApplied)), old, repeat)
}

// Without a callback token, a callback only drops the changed tags: every
// replica refetches and serves the upstream's value, and a forged callback
// (right SdkAppid, made-up value) never gets its value served.
func TestUnsignedCallbackInvalidates(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	t.Cleanup(sim.Close)
	rigs := threeReplicas(t, singleRedis(t), sim, srv.URL, proxy.Config{CallbackUnsigned: true})
	sim.SetCallback(imsim.Callback{URL: "http://" + rigs[2].p.Addr() + "/im/callback"})
	const acc = "user13"
	for _, r := range rigs {
		nickOn(t, r, acc)
	}
	if err := sim.ClientSet(acc, []im.ProfileItem{nickItem("real change")}); err != nil {
		t.Fatal(err)
	}
	changed := time.Now()
	for _, r := range rigs {
		waitNick(t, r, acc, "real change", changed)
	}
	forged := `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"` + acc + `","EventTime":` +
		fmt.Sprint(time.Now().UnixMilli()) + `,"ProfileItem":[{"Tag":"` + nickTag + `","Value":"forged"}]}`
	resp, err := http.Post("http://"+rigs[2].p.Addr()+"/im/callback?SdkAppid="+fmt.Sprint(sim.SDKAppID())+"&CallbackCommand=Profile.CallbackPortraitSet",
		"application/json", strings.NewReader(forged))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	for i, r := range rigs {
		if got := nickOn(t, r, acc); got != "real change" {
			t.Fatalf("replica %c serves %q after a forged callback", 'A'+i, got)
		}
	}
}

// A fetch that read the old value before a change, and is answered after
// the change reached the cache, does not overwrite it: not in the replica
// that fetched, not in the others, not in Redis.
func TestInFlightFetchLosesToChange(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Faults: imsim.Faults{Latency: 300 * time.Millisecond}})
	rs := singleRedis(t)
	rigs := threeReplicas(t, rs, sim, srv.URL, proxy.Config{})
	const acc = "user11"
	got := make(chan string, 1)
	go func() {
		out, err := rigs[0].try(t.Context(), []string{acc}, nickTag)
		if err != nil || len(out.UserProfileItem) != 1 || len(out.UserProfileItem[0].ProfileItem) != 1 {
			got <- "error"
			return
		}
		var s string
		json.Unmarshal(out.UserProfileItem[0].ProfileItem[0].Value, &s)
		got <- s
	}()
	// Served: the fetch has read the old value; its answer is 300 ms away.
	wait.For(t, 5*time.Second, "the fetch to reach the emulator", func() bool { return sim.Stats().Served != 0 })
	if e := rigs[1].set(t, acc, nickItem("changed mid-fetch")); e.ErrorCode != 0 {
		t.Fatalf("portrait_set: %+v", e)
	}
	if s := <-got; s != seededNick(acc) {
		t.Fatalf("the lookup made before the change got %q, want the old value %q", s, seededNick(acc))
	}
	time.Sleep(20 * time.Millisecond) // the late fetch's write-back is queued, then refused
	for i, r := range rigs {
		if s := nickOn(t, r, acc); s != "changed mid-fetch" {
			t.Fatalf("replica %c serves %q after the late fetch", 'A'+i, s)
		}
	}
	fresh := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	if s := nickOn(t, fresh, acc); s != "changed mid-fetch" {
		t.Fatalf("the shared tier holds %q", s)
	}
	if n := sim.FetchCount(acc); n != 1 {
		t.Fatalf("fetched %d times", n)
	}
}

// portrait_set through the proxy: the upstream's refusals come back as the
// upstream gave them, caller mistakes never reach it, and a set that got
// no answer drops the cached tags instead of leaving them stale.
func TestSetErrors(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	for _, c := range []struct {
		name string
		body string
		code int
	}{
		{"not JSON", `{`, im.CodeJSONParse},
		{"no account", `{"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"x"}]}`, im.CodeBadRequest},
		{"no items", `{"From_Account":"user1","ProfileItem":[]}`, im.CodeBadRequest},
		{"bad tag", `{"From_Account":"user1","ProfileItem":[{"Tag":"Nick","Value":"x"}]}`, im.CodeInvalidTag},
		{"no value", `{"From_Account":"user1","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick"}]}`, im.CodeBadRequest},
		{"long id", `{"From_Account":"` + strings.Repeat("x", 33) + `","ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"x"}]}`, im.CodeBadRequest},
	} {
		resp, err := r.httpc.Post(strings.Replace(r.url, im.PathGet, im.PathSet, 1), "application/json", strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		var e im.Envelope
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != 200 || e.ErrorCode != c.code || e.ActionStatus != "FAIL" {
			t.Errorf("%s: HTTP %d %+v, want code %d", c.name, resp.StatusCode, e, c.code)
		}
	}
	if st := r.sim.Stats(); st.Sets != 0 {
		t.Fatalf("%d bad sets reached the upstream", st.Sets)
	}
	if e := r.set(t, "nobody", nickItem("x")); e.ErrorCode != im.CodeAccountNotFound {
		t.Fatalf("set on a missing account: %+v", e)
	}
	if e := r.set(t, "user1", im.ProfileItem{Tag: "Tag_Profile_IM_Level", Value: json.RawMessage(`"high"`)}); e.ErrorCode != im.CodeBadRequest {
		t.Fatalf("a refused value: %+v", e)
	}
	// A set that gets no answer (the upstream may or may not have applied
	// it) drops the cached value: the next lookup fetches it again.
	nickOn(t, r, "user2")
	before := r.sim.FetchCount("user2")
	r.sim.SetFaults(imsim.Faults{Fail502: 1})
	if e := r.set(t, "user2", nickItem("lost")); e.ErrorCode != im.CodeInternal {
		t.Fatalf("a set answered 502: %+v", e)
	}
	r.sim.SetFaults(imsim.Faults{})
	if got := nickOn(t, r, "user2"); got != seededNick("user2") {
		t.Fatalf("after the failed set: %q", got)
	}
	if n := r.sim.FetchCount("user2"); n != before+1 {
		t.Fatalf("fetched %d times after the failed set, want 1 (the cached value dropped)", n-before)
	}
}

// The same race with a background refresh: a stale value is served and
// refreshed; the refresh reads the old value, a portrait_set lands while
// it is in flight, and the refresh's late answer does not undo the set.
func TestRefreshLosesToChange(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	rs := singleRedis(t)
	rigs := threeReplicas(t, rs, sim, srv.URL, proxy.Config{TTL: 50 * time.Millisecond})
	const acc = "user12"
	nickOn(t, rigs[0], acc)
	time.Sleep(60 * time.Millisecond) // past fresh: the next lookup is served stale and refreshed
	sim.SetFaults(imsim.Faults{Latency: 300 * time.Millisecond})
	served := sim.Stats().Served
	if got := nickOn(t, rigs[0], acc); got != seededNick(acc) {
		t.Fatalf("stale read %q", got)
	}
	// Served: the refresh has read the old value.
	wait.For(t, 5*time.Second, "the refresh to reach the emulator", func() bool { return sim.Stats().Served != served })
	if e := rigs[1].set(t, acc, nickItem("changed mid-refresh")); e.ErrorCode != 0 {
		t.Fatalf("portrait_set: %+v", e)
	}
	time.Sleep(400 * time.Millisecond) // the refresh is answered and written back (or refused)
	sim.SetFaults(imsim.Faults{})
	for i, r := range rigs {
		if s := nickOn(t, r, acc); s != "changed mid-refresh" {
			t.Fatalf("replica %c serves %q after the late refresh", 'A'+i, s)
		}
	}
	fresh := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	if s := nickOn(t, fresh, acc); s != "changed mid-refresh" {
		t.Fatalf("the shared tier holds %q", s)
	}
}
