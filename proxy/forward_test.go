package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
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
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// callerQuery is the query an SDK sends: identifier, its UserSig signed
// with key, sdkappid, random, contenttype.
func callerQuery(sim *imsim.Server, identifier, key string) string {
	sig := usersig.Sign(key, sim.SDKAppID(), identifier, time.Now(), time.Hour)
	return url.Values{"sdkappid": {fmt.Sprint(sim.SDKAppID())}, "identifier": {identifier}, "usersig": {sig},
		"random": {"4242"}, "contenttype": {"json"}}.Encode()
}

// noRedirects is a client that fails on any redirect, so a test sees one.
var noRedirects = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error {
	return errors.New("redirected")
}}

// call sends method path?query with body to r's API listener and returns
// the status and body.
func (r *rig) call(t *testing.T, method, path, query, contentType string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+r.p.Addr()+path+"?"+query, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, raw
}

func envelopeOf(t *testing.T, raw []byte) im.Envelope {
	t.Helper()
	var e im.Envelope
	if err := json.Unmarshal(raw, &e); err != nil {
		t.Fatalf("answer %q: %v", raw, err)
	}
	return e
}

func forwarded(r *rig, service, result string) float64 {
	return testutil.ToFloat64(r.p.Metrics().Forwarded.WithLabelValues(service, result))
}

// A forwarded call's method, path, query, content type and body arrive
// at the upstream byte for byte, and its answer comes back byte for byte.
// The caller's own identifier and UserSig go upstream: a second admin of
// the app (the proxy's admin is another) is refused by the upstream as not
// an admin, so nothing of the proxy's credentials was put in its place.
func TestForwardUnchanged(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	body := []byte("{\"SyncOtherMachine\":2,\"From_Account\":\"user1\",\"To_Account\":\"user2\",\"MsgRandom\":18446744073709551615,\n" +
		"\"MsgBody\":[{\"MsgType\":\"TIMTextElem\",\"MsgContent\":{\"Text\":\"h\u00e9llo \\u00e9 <&>\"}}]}  \n")
	query := callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()) + "&extra=%2Fkept&empty="
	status, raw := r.call(t, http.MethodPost, "/v4/openim/sendmsg", query, "application/json; charset=utf-8", body)
	seen := r.sim.Seen()
	if len(seen) != 1 {
		t.Fatalf("upstream saw %d calls", len(seen))
	}
	s := seen[0]
	if s.Method != http.MethodPost || s.Path != "/v4/openim/sendmsg" || s.RawQuery != query || s.ContentType != "application/json; charset=utf-8" || !bytes.Equal(s.Body, body) {
		t.Fatalf("upstream saw %s %s?%s (%s) %q\nsent %q?%s %q", s.Method, s.Path, s.RawQuery, s.ContentType, s.Body, "/v4/openim/sendmsg", query, body)
	}
	if status != http.StatusOK || !bytes.Equal(raw, s.Answer) {
		t.Fatalf("caller got %d %q, upstream answered %d %q", status, raw, s.Status, s.Answer)
	}
	if forwarded(r, "openim", metrics.ForwardOK) != 1 {
		t.Fatal("forwarded_requests_total{openim,ok} not counted")
	}

	// Another admin of the app, with a valid UserSig of its own.
	admin2 := callerQuery(r.sim, "admin2", r.sim.Key())
	status, raw = r.call(t, http.MethodPost, "/v4/group_open_http_svc/get_appid_group_list", admin2, "application/json", []byte(`{}`))
	if e := envelopeOf(t, raw); status != 200 || e.ErrorCode != im.CodeNeedAdmin {
		t.Fatalf("upstream answered %d %+v, want its own 40004", status, e)
	}
	if s := r.sim.Seen()[1]; s.Identifier != "admin2" || s.UserSig != usersigOf(admin2) || s.RawQuery != admin2 {
		t.Fatalf("upstream saw identifier %q sig %q", s.Identifier, s.UserSig)
	}
	// Unknown services are counted as other.
	r.call(t, http.MethodPost, "/v4/newsvc/newcmd", callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()), "application/json", []byte(`{}`))
	if forwarded(r, metrics.ServiceOther, metrics.ForwardOK) != 1 {
		t.Fatal("an unknown service is not counted as other")
	}
	if st := r.sim.Stats(); st.Calls != 0 {
		t.Fatalf("forwarded calls reached portrait_get: %+v", st)
	}
}

func usersigOf(rawQuery string) string {
	q, _ := url.ParseQuery(rawQuery)
	return q.Get("usersig")
}

// A forged UserSig: with -auth usersig the proxy refuses it before the
// upstream (whose sig failures count against the whole app); on a trusted
// network (-auth none) it reaches the upstream, which refuses it. Either
// way the forged sig is what the upstream saw, never the proxy's own.
func TestForwardForgedUserSig(t *testing.T) {
	t.Run("usersig", func(t *testing.T) {
		r := start(t, imsim.Config{}, proxy.Config{})
		forged := callerQuery(r.sim, r.sim.Identifier(), "not-the-key")
		status, raw := r.call(t, http.MethodPost, "/v4/im_open_login_svc/account_delete", forged, "application/json", []byte(`{"DeleteItem":[{"UserID":"user1"}]}`))
		if e := envelopeOf(t, raw); status != 200 || e.ErrorCode != im.CodeSigMismatch {
			t.Fatalf("answer %d %+v, want 70009", status, e)
		}
		if n := len(r.sim.Seen()); n != 0 {
			t.Fatalf("a forged UserSig reached the upstream (%d calls)", n)
		}
		if !r.sim.Exists("user1") || forwarded(r, "im_open_login_svc", metrics.ForwardRejected) != 1 {
			t.Fatal("account deleted, or refusal not counted")
		}
	})
	t.Run("none", func(t *testing.T) {
		r := start(t, imsim.Config{}, proxy.Config{Auth: "none"})
		forged := callerQuery(r.sim, r.sim.Identifier(), "not-the-key")
		out := r.get(t, []string{"user1"}, nickTag) // cached, found
		status, raw := r.call(t, http.MethodPost, "/v4/im_open_login_svc/account_delete", forged, "application/json", []byte(`{"DeleteItem":[{"UserID":"user1"}]}`))
		if e := envelopeOf(t, raw); status != 200 || e.ErrorCode != im.CodeSigMismatch {
			t.Fatalf("answer %d %+v, want the upstream's 70009", status, e)
		}
		seen := r.sim.Seen()
		if len(seen) != 1 || seen[0].UserSig != usersigOf(forged) || r.sim.Stats().AuthFailures != 1 {
			t.Fatalf("upstream saw %+v", seen)
		}
		// The refused deletion changed nothing in the cache.
		if again := r.get(t, []string{"user1"}, nickTag); again.UserProfileItem[0].ResultCode != 0 ||
			string(again.UserProfileItem[0].ProfileItem[0].Value) != string(out.UserProfileItem[0].ProfileItem[0].Value) {
			t.Fatalf("a refused account_delete changed the cache: %+v", again)
		}
	})
}

// Calls the proxy refuses without sending: not POST, path tricks, bodies
// over the limit; and no path is ever redirected.
func TestForwardRefusalsAndPaths(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{ForwardMaxBody: 64 << 10})
	q := callerQuery(r.sim, r.sim.Identifier(), r.sim.Key())
	for _, c := range []struct {
		name, method, path string
		body               []byte
		code               int
	}{
		{"GET", http.MethodGet, "/v4/openim/sendmsg", nil, im.CodeHTTPParse},
		{"dot-dot", http.MethodPost, "/v4/../v4/openim/sendmsg", []byte(`{}`), im.CodeHTTPParse},
		{"dot-dot into portrait_get", http.MethodPost, "/v4/openim/../profile/portrait_get", []byte(`{}`), im.CodeHTTPParse},
		{"dot", http.MethodPost, "/v4/./openim/sendmsg", []byte(`{}`), im.CodeHTTPParse},
		{"escaped", http.MethodPost, "/v4/openim/%73endmsg", []byte(`{}`), im.CodeHTTPParse},
		{"escaped slash", http.MethodPost, "/v4/openim%2Fsendmsg/x", []byte(`{}`), im.CodeHTTPParse},
		{"too deep", http.MethodPost, "/v4/openim/sendmsg/more", []byte(`{}`), im.CodeHTTPParse},
		{"no command", http.MethodPost, "/v4/openim", []byte(`{}`), im.CodeHTTPParse},
		{"huge body", http.MethodPost, "/v4/openim/sendmsg", bytes.Repeat([]byte("x"), 1<<20), im.CodeBadRequest},
	} {
		status, raw := r.call(t, c.method, c.path, q, "application/json", c.body)
		if e := envelopeOf(t, raw); status != 200 || e.ErrorCode != c.code || e.ActionStatus != "FAIL" || e.ErrorInfo == "" {
			t.Errorf("%s: %d %+v, want HTTP 200 and %d", c.name, status, e, c.code)
		}
	}
	if n := len(r.sim.Seen()); n != 0 {
		t.Fatalf("%d refused calls reached the upstream: %+v", n, r.sim.Seen())
	}
	// Doubled and trailing slashes are read as the upstream's front reads
	// them: answered (portrait_get) or forwarded to the canonical path.
	body, _ := json.Marshal(im.GetRequest{ToAccount: []string{"user3"}, TagList: []string{nickTag}})
	for _, p := range []string{"//v4/profile/portrait_get", "/v4/profile/portrait_get/", "/v4//profile///portrait_get"} {
		status, raw := r.call(t, http.MethodPost, p, q, "application/json", body)
		var out im.GetResponse
		if err := json.Unmarshal(raw, &out); err != nil || status != 200 || out.ErrorCode != 0 {
			t.Fatalf("%s: %d %s", p, status, raw)
		}
		checkItem(t, out.UserProfileItem[0], "user3", nickTag)
	}
	status, _ := r.call(t, http.MethodPost, "//v4//openim/sendmsg/", q, "application/json", []byte(`{}`))
	if seen := r.sim.Seen(); status != 200 || len(seen) != 1 || seen[0].Path != "/v4/openim/sendmsg" {
		t.Fatalf("doubled slashes: %d, upstream saw %+v", status, seen)
	}
}

// -forward off keeps the answer the proxy gave before forwarding existed.
func TestForwardOff(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{DisableForward: true})
	status, raw := r.call(t, http.MethodPost, "/v4/openim/sendmsg", callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()), "application/json", []byte(`{}`))
	if e := envelopeOf(t, raw); status != http.StatusNotFound || e.ErrorCode != im.CodeHTTPParse || !strings.Contains(e.ErrorInfo, "no such API") {
		t.Fatalf("%d %+v", status, e)
	}
	if len(r.sim.Seen()) != 0 {
		t.Fatal("forwarded with -forward off")
	}
}

// No answer from the upstream is answered the IM way (HTTP 200, an IM code,
// a clear ErrorInfo) and counted; the call is not retried.
func TestForwardUpstreamDown(t *testing.T) {
	t.Run("refused", func(t *testing.T) {
		sim, srv := simtest.Start(t, imsim.Config{})
		r := startProxy(t, sim, srv.URL, proxy.Config{})
		srv.Close()
		status, raw := r.call(t, http.MethodPost, "/v4/openim/sendmsg", callerQuery(sim, sim.Identifier(), sim.Key()), "application/json", []byte(`{}`))
		e := envelopeOf(t, raw)
		if status != 200 || e.ActionStatus != "FAIL" || e.ErrorCode != im.CodeInternal || !strings.Contains(e.ErrorInfo, "not sent") {
			t.Fatalf("%d %+v", status, e)
		}
		if strings.Contains(string(raw), "usersig") || forwarded(r, "openim", metrics.ForwardUnreachable) != 1 {
			t.Fatalf("answer %s, unreachable counted %v", raw, forwarded(r, "openim", metrics.ForwardUnreachable))
		}
	})
	t.Run("timeout", func(t *testing.T) {
		r := start(t, imsim.Config{Faults: imsim.Faults{Latency: 3 * time.Second}}, proxy.Config{UpstreamTimeout: 200 * time.Millisecond})
		status, raw := r.call(t, http.MethodPost, "/v4/openim/sendmsg", callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()), "application/json", []byte(`{}`))
		e := envelopeOf(t, raw)
		if status != 200 || e.ErrorCode != im.CodeInternalTimeout || !strings.Contains(e.ErrorInfo, "may have been applied") {
			t.Fatalf("%d %+v", status, e)
		}
		if n := r.sim.Stats().Other; n != 1 || forwarded(r, "openim", metrics.ForwardTimeout) != 1 {
			t.Fatalf("upstream saw %d calls", n)
		}
	})
}

// A call whose connection dies after the upstream read it is not sent
// again, even on a reused keep-alive connection (where Go's transport
// retries requests it deems replayable); throttling answers come back as
// the upstream gave them, not retried either.
func TestForwardNeverRetried(t *testing.T) {
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{APIQuota: 1}}, proxy.Config{})
	q := callerQuery(r.sim, r.sim.Identifier(), r.sim.Key())
	if status, raw := r.call(t, http.MethodPost, "/v4/openim/querystate", q, "application/json", []byte(`{}`)); status != 200 || envelopeOf(t, raw).ErrorCode != 0 {
		t.Fatalf("warm-up: %d %s", status, raw) // leaves a keep-alive connection to the upstream
	}
	r.sim.SetFaults(imsim.Faults{Drop: 1})
	// Without a body and with this header, Go's transport would take the
	// call for replayable and send it again.
	req, _ := http.NewRequest(http.MethodPost, "http://"+r.p.Addr()+"/v4/openim/sendmsg?"+q, nil)
	req.Header.Set("Idempotency-Key", "1")
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if e := envelopeOf(t, raw); resp.StatusCode != 200 || e.ErrorCode == 0 || !strings.Contains(e.ErrorInfo, "may have been applied") {
		t.Fatalf("dropped call answered %d %+v", resp.StatusCode, e)
	}
	if st := r.sim.Stats(); st.Dropped != 1 || st.Other != 2 {
		t.Fatalf("upstream received the call %d times (%d dropped)", st.Other-1, st.Dropped)
	}
	r.sim.SetFaults(imsim.Faults{})
	var codes []int
	for range 2 {
		_, raw := r.call(t, http.MethodPost, "/v4/openim/sendmsg", q, "application/json", []byte(`{}`))
		codes = append(codes, envelopeOf(t, raw).ErrorCode)
	}
	if codes[0] != 0 || codes[1] != im.CodeFreqLimit {
		t.Fatalf("codes %v, want 0 then the upstream's 60007", codes)
	}
	if st := r.sim.Stats(); st.Other != 4 || st.OtherThrottled != 1 {
		t.Fatalf("throttled call retried: %+v", st)
	}
}

// An answer that is not the upstream's (a compromised or confused hop)
// cannot make the cache drop or deny accounts the request did not name, and
// per-item results are respected.
func TestForgedAccountAnswersCannotPoison(t *testing.T) {
	sim := imsim.New(imsim.Config{})
	forgedAnswer := []byte(`{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ResultItem":[` +
		`{"ResultCode":0,"ResultInfo":"","UserID":"user8"},{"ResultCode":0,"UserID":"user9"},{"ResultCode":70107,"UserID":"user4"}]}`)
	front := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == imsim.PathAccountDelete {
			io.Copy(io.Discard, req.Body)
			w.Write(forgedAnswer)
			return
		}
		sim.ServeHTTP(w, req)
	})
	srv := httptestServer(t, front)
	r := startProxy(t, sim, srv, proxy.Config{})
	r.get(t, []string{"user4", "user8", "user9"}, nickTag)
	_, raw := r.call(t, http.MethodPost, imsim.PathAccountDelete, callerQuery(sim, sim.Identifier(), sim.Key()), "application/json",
		[]byte(`{"DeleteItem":[{"UserID":"user8"},{"UserID":"user4"}]}`))
	if !bytes.Equal(raw, forgedAnswer) {
		t.Fatalf("answer changed: %s", raw)
	}
	out := r.get(t, []string{"user4", "user8", "user9"}, nickTag)
	for i, want := range []int{0, im.CodeAccountNotFound, 0} {
		if got := out.UserProfileItem[i].ResultCode; got != want {
			t.Fatalf("%s: ResultCode %d, want %d", out.UserProfileItem[i].ToAccount, got, want)
		}
	}
	if sim.FetchCount("user9") != 1 || sim.FetchCount("user4") != 1 {
		t.Fatal("accounts the deletion did not remove were dropped from the cache")
	}
}

func httptestServer(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL
}

// forwardAccount posts an account call through r with the app's admin.
func forwardAccount(t *testing.T, r *rig, path, body string) []byte {
	t.Helper()
	status, raw := r.call(t, http.MethodPost, path, callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()), "application/json", []byte(body))
	if e := envelopeOf(t, raw); status != 200 || e.ErrorCode != 0 {
		t.Fatalf("%s: %d %s", path, status, raw)
	}
	return raw
}

// waitResult looks account up through r until its ResultCode is want, at
// most 2 s from from, and returns the item and how long after from it came
// (as fine as wait.For's polls: the propagation itself is measured in make
// bench).
func waitResult(t *testing.T, r *rig, account string, want int, from time.Time) (im.UserProfile, time.Duration) {
	t.Helper()
	var it im.UserProfile
	var d time.Duration
	wait.For(t, time.Until(from.Add(2*time.Second)), fmt.Sprintf("%s to answer ResultCode %d for %s", r.p.Addr(), want, account), func() bool {
		out := r.get(t, []string{account}, nickTag)
		if out.ErrorCode != 0 || out.UserProfileItem[0].ResultCode != want {
			return false
		}
		it, d = out.UserProfileItem[0], time.Since(from)
		return true
	})
	return it, d
}

// An account looked up (and remembered as not found) on three replicas,
// then imported through one of them, is found on all three at once: the
// negative entries are dropped in Redis and in every in-process tier
// through the change feed, without waiting for -negative-ttl.
func TestImportedFoundOnAllReplicas(t *testing.T) {
	for name, setup := range map[string]func(*testing.T) redisSetup{"single": singleRedis, "cluster": clusterRedis} {
		t.Run(name, func(t *testing.T) {
			sim, srv := simtest.Start(t, imsim.Config{})
			rigs := threeReplicas(t, setup(t), sim, srv.URL, proxy.Config{NegativeTTL: time.Hour})
			for _, r := range rigs {
				for _, a := range []string{"newbie", "multi1", "multi2"} {
					if it := r.get(t, []string{a}, nickTag).UserProfileItem[0]; it.ResultCode != im.CodeAccountNotFound {
						t.Fatalf("%s before its import: %+v", a, it)
					}
				}
			}
			from := time.Now()
			forwardAccount(t, rigs[1], imsim.PathAccountImport, `{"UserID":"newbie","Nick":"Newbie","FaceUrl":"https://x/y.png"}`)
			for _, r := range rigs {
				it, d := waitResult(t, r, "newbie", 0, from)
				if len(it.ProfileItem) != 1 || string(it.ProfileItem[0].Value) != `"Newbie"` {
					t.Fatalf("newbie on %s: %+v", r.p.Addr(), it)
				}
				t.Logf("imported account found on %s after %v", r.p.Addr(), d)
			}
			from = time.Now()
			raw := forwardAccount(t, rigs[2], imsim.PathMultiAccountImport, `{"Accounts":["multi1","multi2","`+strings.Repeat("x", 40)+`"]}`)
			if !strings.Contains(string(raw), `"FailAccounts":["xxxx`) {
				t.Fatalf("answer %s", raw)
			}
			for _, r := range rigs {
				waitResult(t, r, "multi1", 0, from)
				waitResult(t, r, "multi2", 0, from)
			}
		})
	}
}

// An account served from every replica's cache, deleted through one of
// them, is "not found" on all three at once, without asking the upstream;
// an item the upstream did not delete keeps its profile.
func TestDeletedNotFoundOnAllReplicas(t *testing.T) {
	for name, setup := range map[string]func(*testing.T) redisSetup{"single": singleRedis, "cluster": clusterRedis} {
		t.Run(name, func(t *testing.T) {
			sim, srv := simtest.Start(t, imsim.Config{})
			rigs := threeReplicas(t, setup(t), sim, srv.URL, proxy.Config{})
			for _, r := range rigs {
				checkItem(t, r.get(t, []string{"user5"}, nickTag).UserProfileItem[0], "user5", nickTag)
			}
			fetched := sim.FetchCount("user5")
			from := time.Now()
			raw := forwardAccount(t, rigs[0], imsim.PathAccountDelete, `{"DeleteItem":[{"UserID":"user5"},{"UserID":"nobody"}]}`)
			if !strings.Contains(string(raw), `"ResultCode":70107`) {
				t.Fatalf("answer %s", raw)
			}
			for _, r := range rigs {
				_, d := waitResult(t, r, "user5", im.CodeAccountNotFound, from)
				t.Logf("deleted account not found on %s after %v", r.p.Addr(), d)
			}
			if n := sim.FetchCount("user5"); n != fetched {
				t.Fatalf("the upstream was asked for the deleted account %d more times", n-fetched)
			}
			// Imported again: found again at once.
			from = time.Now()
			forwardAccount(t, rigs[2], imsim.PathAccountImport, `{"Identifier":"user5","Nick":"Back"}`)
			for _, r := range rigs {
				waitResult(t, r, "user5", 0, from)
			}
		})
	}
}

// A deletion whose answer never came (the connection dropped after the
// upstream read it) drops the cached profile everywhere: the next lookup
// asks the upstream, whatever it did.
func TestDeleteUnknownOutcomeDropsProfiles(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{})
	rigs := threeReplicas(t, rs, sim, srv.URL, proxy.Config{})
	for _, r := range rigs {
		r.get(t, []string{"user6"}, nickTag)
	}
	sim.SetFaults(imsim.Faults{Drop: 1})
	status, raw := rigs[0].call(t, http.MethodPost, imsim.PathAccountDelete, callerQuery(sim, sim.Identifier(), sim.Key()), "application/json",
		[]byte(`{"DeleteItem":[{"UserID":"user6"}]}`))
	if e := envelopeOf(t, raw); status != 200 || e.ErrorCode == 0 {
		t.Fatalf("%d %+v", status, e)
	}
	sim.SetFaults(imsim.Faults{})
	// The emulator read the request, then dropped it, without deleting:
	// the account is there, and every replica asks again instead of
	// serving what its in-process tier held.
	before := sim.FetchCount("user6")
	deadline := time.Now().Add(2 * time.Second)
	for _, r := range rigs {
		misses := r.p.Metrics().CacheLookups.WithLabelValues("local", "miss")
		wait.For(t, time.Until(deadline), r.p.Addr()+" to stop serving a profile it cannot know is there", func() bool {
			m := testutil.ToFloat64(misses)
			checkItem(t, r.get(t, []string{"user6"}, nickTag).UserProfileItem[0], "user6", nickTag)
			return testutil.ToFloat64(misses) > m
		})
	}
	// The first replica fetched it; the others read that fetch from Redis
	// or, when its write-back had not landed yet, fetched it themselves.
	if n := sim.FetchCount("user6") - before; n < 1 || n > len(rigs) {
		t.Fatalf("user6 fetched %d times after the dropped deletion, want 1 to %d", n, len(rigs))
	}
}

// Shutdown waits for forwarded calls in flight: the caller gets the
// upstream's answer, and Run returns cleanly.
func TestShutdownWithForwardedCallInFlight(t *testing.T) {
	r := start(t, imsim.Config{Faults: imsim.Faults{Latency: 300 * time.Millisecond}}, proxy.Config{})
	type result struct {
		status int
		raw    []byte
	}
	got := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, "http://"+r.p.Addr()+"/v4/openim/sendmsg?"+callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()), strings.NewReader(`{}`))
		resp, err := noRedirects.Do(req)
		if err != nil {
			got <- result{}
			return
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		got <- result{resp.StatusCode, raw}
	}()
	wait.For(t, 5*time.Second, "the call to reach the upstream", func() bool { return r.sim.Stats().Other > 0 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	res := <-got
	if res.status != 200 || envelopeOf(t, res.raw).ErrorCode != 0 {
		t.Fatalf("in-flight call answered %d %s", res.status, res.raw)
	}
}

// Forwarded calls that get no answer are logged (at most one line a second
// per cause), and neither the caller's UserSig nor the query is in the
// line.
func TestForwardFailuresLoggedWithoutSecrets(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Key: "s3cr3t-app-key-0123456789abcdef", Faults: imsim.Faults{Drop: 1}})
	logs := &syncBuffer{}
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(), SecretKey: sim.Key(),
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	q := callerQuery(sim, sim.Identifier(), sim.Key())
	resp, err := http.Post("http://"+p.Addr()+"/v4/openim/sendmsg?"+q, "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	if !strings.Contains(logs.String(), "forwarded openim call") {
		t.Fatalf("the failure was not logged:\n%s", logs.String())
	}
	sig := usersigOf(q)
	for _, text := range []string{logs.String(), string(raw)} {
		if strings.Contains(text, sig) || strings.Contains(text, sim.Key()) || strings.Contains(text, "eJ") {
			t.Fatalf("a secret in %s", text)
		}
	}
}
