package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// rawAnswer is what a caller sees of an answer, but the Date and the
// order of the headers.
type rawAnswer struct {
	status         int
	ctype, clen    string
	close, hasDate bool
	body           string
}

// rawCall writes req on a new connection and reads one answer.
func rawCall(t *testing.T, addr, req string) rawAnswer {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	go io.WriteString(c, req) // a large body is written while the answer is read
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%.80q: %v", req, err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return rawAnswer{resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Content-Length"), resp.Close,
		resp.Header.Get("Date") != "", string(b)}
}

// The lean front answers every portrait_get it serves as net/http did:
// status, Content-Type, Content-Length, Connection and the body, for the
// good call and every error envelope (query, body, limits), and counts
// them the same in requests_total.
func TestLeanFrontAnswersAsNetHTTP(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	lean := startProxy(t, sim, srv.URL, proxy.Config{})
	plain := startProxy(t, sim, srv.URL, proxy.Config{NetHTTPOnly: true})
	q := func(mod func(url.Values)) string {
		v := url.Values{"sdkappid": {fmt.Sprint(sim.SDKAppID())}, "identifier": {sim.Identifier()}, "random": {"1"}, "contenttype": {"json"},
			"usersig": {usersig.Sign(sim.Key(), sim.SDKAppID(), sim.Identifier(), time.Now(), time.Hour)}}
		if mod != nil {
			mod(v)
		}
		return v.Encode()
	}
	post := func(query, body string, extra ...string) string {
		h := "POST " + im.PathGet + "?" + query + " HTTP/1.1\r\nHost: proxy\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n"
		for _, e := range extra {
			h += e + "\r\n"
		}
		return h + "\r\n" + body
	}
	good := `{"To_Account":["user1","user2"],"TagList":["Tag_Profile_IM_Nick"]}`
	pad := func(n int) string { return good + strings.Repeat(" ", n-len(good)) }
	cases := map[string]string{
		"good":            post(q(nil), good),
		"good, close":     post(q(nil), good, "Connection: close"),
		"no sdkappid":     post(q(func(v url.Values) { v.Del("sdkappid") }), good),
		"other app":       post(q(func(v url.Values) { v.Set("sdkappid", "7") }), good),
		"bad sig":         post(q(func(v url.Values) { v.Set("usersig", "eJxbad") }), good),
		"not admin":       post(q(func(v url.Values) { v.Set("identifier", "bob") }), good),
		"two sigs":        post(q(nil)+"&usersig=x", good),
		"semicolon":       post(q(nil)+"&a;b=1", good),
		"bad escape":      post(q(nil)+"&x=%zz", good),
		"no query":        post("", good),
		"empty body":      post(q(nil), ""),
		"no length":       "POST " + im.PathGet + "?" + q(nil) + " HTTP/1.1\r\nHost: proxy\r\n\r\n",
		"not JSON":        post(q(nil), "{"),
		"wrong types":     post(q(nil), `{"To_Account":[1],"TagList":["Tag_Profile_IM_Nick"]}`),
		"no accounts":     post(q(nil), `{"To_Account":[],"TagList":["Tag_Profile_IM_Nick"]}`),
		"bad tag":         post(q(nil), `{"To_Account":["u"],"TagList":["Nick"]}`),
		"invalid account": post(q(nil), `{"To_Account":["","user1"],"TagList":["Tag_Profile_IM_Nick"]}`),
		"body at limit":   post(q(nil), pad(1<<20)),
		"body over limit": post(q(nil), pad(1<<20+1)),
		"GET":             "GET " + im.PathGet + "?" + q(nil) + " HTTP/1.1\r\nHost: proxy\r\n\r\n",
		"trailing slash":  "POST " + im.PathGet + "/?" + q(nil) + " HTTP/1.1\r\nHost: proxy\r\nContent-Length: " + fmt.Sprint(len(good)) + "\r\n\r\n" + good,
		"escaped sig '*'": post(strings.ReplaceAll(q(nil), "%2A", "*"), good),
	}
	for name, req := range cases {
		p, l := rawCall(t, plain.p.Addr(), req), rawCall(t, lean.p.Addr(), req)
		if p != l {
			t.Errorf("%s:\n net/http %+.300v\n lean     %+.300v", name, p, l)
		}
	}
	if p, l := byLabel(plain.p.Metrics().Requests), byLabel(lean.p.Metrics().Requests); fmt.Sprint(p) != fmt.Sprint(l) {
		t.Errorf("requests_total: net/http %v, lean %v", p, l)
	}
	// The front served all but these (by reason): it was the one tested.
	if h := byLabel(lean.p.Metrics().Handoffs); fmt.Sprint(h) != "map[h2:0 http_feature:0 limit:1 malformed:0 other_request:2 tls_error:0]" {
		t.Errorf("hand-offs %v", h)
	}
}

// byLabel is a one-label counter vector's values by label.
func byLabel(v *prometheus.CounterVec) map[string]float64 {
	reg := prometheus.NewRegistry()
	reg.MustRegister(v)
	mfs, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			out[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	return out
}
