package proxy_test

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Any caller whose UserSig is valid for ANY identifier of the app
// (an ordinary user's, as every client SDK holds) can name victims in an
// account_delete and hang up before the answer. The upstream refuses the
// call (not an admin), but the proxy takes the outcome as unknown and drops
// the victims' cached profiles on every replica: the next lookups go to the
// upstream. 1000 accounts per request, repeatable -> cache busting / quota
// exhaustion by an unprivileged caller.
func TestCanceledNonAdminAccountCallKeepsCache(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	r.get(t, []string{"user5"}, nickTag) // cached
	before := r.sim.FetchCount("user5")
	r.get(t, []string{"user5"}, nickTag)
	if r.sim.FetchCount("user5") != before {
		t.Fatal("not cached")
	}
	r.sim.SetFaults(imsim.Faults{Latency: 300 * time.Millisecond})
	q := callerQuery(r.sim, "user1", r.sim.Key()) // an ordinary user's own UserSig
	body := `{"DeleteItem":[{"UserID":"user5"}]}`
	c, err := net.Dial("tcp", r.p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST /v4/im_open_login_svc/account_delete?%s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", q, len(body), body)
	wait.For(t, 5*time.Second, "the account_delete to reach the upstream", func() bool { return r.sim.Stats().Other != 0 })
	c.Close() // hang up before the (refusing) answer
	// Room for the answer (300 ms away) and for a wrong drop after it:
	// nothing signals a drop that does not happen.
	time.Sleep(600 * time.Millisecond)
	r.sim.SetFaults(imsim.Faults{})
	for _, s := range r.sim.Seen() {
		t.Logf("upstream saw %s identifier=%s -> %d %s", s.Path, s.Identifier, s.Status, s.Answer)
	}
	if !r.sim.Exists("user5") {
		t.Fatal("account was really deleted?")
	}
	r.get(t, []string{"user5"}, nickTag)
	if n := r.sim.FetchCount("user5") - before; n != 0 {
		t.Fatalf("a refused account_delete by a non-admin (who hung up) dropped user5 from the cache: %d extra upstream fetches", n)
	}
}

// An account call's answer is read whatever the caller's Accept-Encoding:
// behind an upstream (or gateway) that compresses when asked, a caller
// that asks for gzip still gets a known outcome (the deleted account is
// "not found" from the cache at once, with no fetch) and a readable answer.
func TestAccountCallReadWhenCallerAcceptsGzip(t *testing.T) {
	sim, _ := simtest.Start(t, imsim.Config{})
	var asked atomic.Value
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := httptest.NewRecorder()
		sim.ServeHTTP(rec, r)
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		if strings.Contains(r.URL.Path, "account_") {
			asked.Store(r.Header.Get("Accept-Encoding"))
		}
		if !strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			w.WriteHeader(rec.Code)
			w.Write(rec.Body.Bytes())
			return
		}
		w.Header().Del("Content-Length")
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(rec.Code)
		zw := gzip.NewWriter(w)
		zw.Write(rec.Body.Bytes())
		zw.Close()
	}))
	t.Cleanup(front.Close)
	r := startProxy(t, sim, front.URL, proxy.Config{})
	r.get(t, []string{"user5"}, nickTag)
	q := callerQuery(r.sim, r.sim.Identifier(), r.sim.Key()) // the admin
	body := `{"DeleteItem":[{"UserID":"user5"}]}`
	req, _ := http.NewRequest(http.MethodPost, "http://"+r.p.Addr()+"/v4/im_open_login_svc/account_delete?"+q, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept-Encoding", "gzip") // set by hand: Go's client then does not decode
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Header.Get("Content-Encoding") != "" {
		if zr, err := gzip.NewReader(bytes.NewReader(raw)); err == nil {
			raw, _ = io.ReadAll(zr)
		}
	}
	var ans struct{ ActionStatus string }
	if err := json.Unmarshal(raw, &ans); err != nil || ans.ActionStatus != "OK" {
		t.Fatalf("caller's answer %q (%v)", raw, err)
	}
	if a, _ := asked.Load().(string); a != "gzip" {
		t.Errorf("upstream was asked for Accept-Encoding %q, want Go's own gzip", a)
	}
	if r.sim.Exists("user5") {
		t.Fatal("account not deleted")
	}
	before := r.sim.FetchCount("user5")
	got := r.get(t, []string{"user5"}, nickTag)
	if len(got.UserProfileItem) != 1 || got.UserProfileItem[0].ResultCode != im.CodeAccountNotFound {
		t.Fatalf("deleted account: %+v", got)
	}
	if n := r.sim.FetchCount("user5") - before; n != 0 {
		t.Fatalf("a compressed OK answer to account_delete was taken as unknown: %d fetches after it", n)
	}
}

// The proxy must check the very copy of sdkappid/identifier/usersig the
// upstream reads (the emulator, like Go's url.Query().Get, reads the
// FIRST), decoding keys as it does: a query that repeats one is refused
// the IM way, on forwarded calls and on portrait_get alike. A forged UserSig therefore reaches the upstream behind a valid one,
// against the promise "a forged one never reaches the upstream, where
// failures count against the whole app's sig-failure limit (70050)".
func TestDuplicateQueryKeysNeverReachUpstream(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	forged := usersig.Sign("not-the-key", r.sim.SDKAppID(), r.sim.Identifier(), time.Now(), time.Hour)
	for i, prefix := range []string{
		"identifier=" + r.sim.Identifier() + "&usersig=" + forged + "&",
		"identifier=" + r.sim.Identifier() + "&user%73ig=" + forged + "&",
		"sdkappid=1234&", // another app's calls relayed: the upstream sees sdkappid=1234
		"contenttype=xml&",
		"identifier=" + r.sim.Identifier() + ";usersig=" + forged + "&",
	} {
		q := prefix + callerQuery(r.sim, "user1", r.sim.Key())
		status, body := r.call(t, http.MethodPost, "/v4/openim/sendmsg", q, "application/json", []byte(`{}`))
		var env struct {
			ActionStatus string
			ErrorCode    int
		}
		if err := json.Unmarshal(body, &env); err != nil || status != http.StatusOK || env.ActionStatus != "FAIL" || env.ErrorCode != im.CodeHTTPParse {
			t.Errorf("case %d: answer HTTP %d %s, want 200 FAIL %d", i, status, body, im.CodeHTTPParse)
		}
		seen := r.sim.Seen()
		if len(seen) != 0 {
			t.Errorf("case %d: a query the proxy did not verify reached the upstream: it saw %q (usersig forged: %v), auth failures %d",
				i, seen[len(seen)-1].RawQuery[:40], seen[len(seen)-1].UserSig == forged, r.sim.Stats().AuthFailures)
			r.sim.Reset()
		}
	}
}

func TestDuplicateQueryKeysRefusedOnPortraitGet(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	forged := usersig.Sign("not-the-key", r.sim.SDKAppID(), r.sim.Identifier(), time.Now(), time.Hour)
	base := r.url
	for i, prefix := range []string{"usersig=" + forged + "&", "user%73ig=" + forged + "&", "sdkappid=1234&"} {
		u, _, _ := strings.Cut(base, "?")
		r.url = u + "?" + prefix + base[len(u)+1:]
		got := r.get(t, []string{"user1"}, nickTag)
		if got.ActionStatus != "FAIL" || got.ErrorCode != im.CodeHTTPParse {
			t.Errorf("case %d: %+v, want FAIL %d", i, got, im.CodeHTTPParse)
		}
	}
	r.url = base
	if n := r.sim.FetchCount("user1"); n != 0 {
		t.Errorf("upstream asked %d times", n)
	}
	if got := r.get(t, []string{"user1"}, nickTag); got.ActionStatus != "OK" {
		t.Errorf("well-formed query: %+v", got)
	}
}
