package front

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo answers with what it was given, and can hold an answer until
// released.
type echo struct {
	mu    sync.Mutex
	hold  chan struct{} // if set, ServeFast waits for it (or ctx)
	held  chan struct{} // told when a call is held
	calls int
}

func (e *echo) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	e.mu.Lock()
	e.calls++
	hold, held := e.hold, e.held
	e.mu.Unlock()
	if hold != nil {
		held <- struct{}{}
		select {
		case <-hold:
		case <-ctx.Done():
			return append(out, "cancelled"...)
		}
	}
	return fmt.Appendf(out, "fast q=%s b=%s", rawQuery, body)
}

// fallbackHandler answers every request net/http serves.
func fallbackHandler(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	fmt.Fprintf(w, "net/http %s %s q=%s b=%s", r.Method, r.URL.Path, r.URL.RawQuery, b)
}

type testServer struct {
	s    *Server
	addr string
	h    *echo
	hand *prometheus.CounterVec
	done chan error
}

func start(t *testing.T, tune func(*http.Server), tlsCfg *tls.Config) *testServer {
	t.Helper()
	fb := &http.Server{Handler: http.HandlerFunc(fallbackHandler), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second, MaxHeaderBytes: 4096, TLSConfig: tlsCfg}
	if tune != nil {
		tune(fb)
	}
	ts := &testServer{h: &echo{}, done: make(chan error, 1),
		hand: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "handoffs"}, []string{"reason"})}
	s, err := New(Config{Path: testPath, Handler: ts.h, Fallback: fb, MaxBodyBytes: 1024, Handoffs: ts.hand})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.s, ts.addr = s, ln.Addr().String()
	go func() {
		if tlsCfg != nil {
			ts.done <- s.ServeTLS(ln)
		} else {
			ts.done <- s.Serve(ln)
		}
	}()
	t.Cleanup(func() {
		s.Close()
		if err := <-ts.done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return ts
}

func (ts *testServer) handoffs(reason string) float64 {
	return testutil.ToFloat64(ts.hand.WithLabelValues(reason))
}

// client is one raw keep-alive connection.
type client struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dial(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *client) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.c, s); err != nil {
		c.t.Fatal(err)
	}
}

// answer reads one response and returns its body.
func (c *client) answer() (*http.Response, string) {
	c.t.Helper()
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	return resp, string(b)
}

func lookup(query, body string, extra ...string) string {
	h := "POST " + testPath + "?" + query + " HTTP/1.1\r\nHost: proxy\r\nContent-Length: " + fmt.Sprint(len(body)) + "\r\n"
	for _, e := range extra {
		h += e + "\r\n"
	}
	return h + "\r\n" + body
}

func TestServedAndHandedOff(t *testing.T) {
	ts := start(t, nil, nil)
	c := dial(t, ts.addr)
	c.send(lookup("a=1", `{"x":1}`))
	resp, body := c.answer()
	if body != `fast q=a=1 b={"x":1}` || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/json" ||
		resp.ContentLength != int64(len(body)) || resp.Close {
		t.Fatalf("%d %v %q", resp.StatusCode, resp.Header, body)
	}
	if _, err := http.ParseTime(resp.Header.Get("Date")); err != nil {
		t.Fatalf("Date %q: %v", resp.Header.Get("Date"), err)
	}
	// Another API on the same connection: net/http serves it, and the
	// connection from then on.
	c.send("POST /v4/openim/sendmsg?b=2 HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n\r\nabc")
	if _, body := c.answer(); body != "net/http POST /v4/openim/sendmsg q=b=2 b=abc" {
		t.Fatalf("handed off: %q", body)
	}
	c.send(lookup("a=3", "{}"))
	if _, body := c.answer(); body != "net/http POST "+testPath+" q=a=3 b={}" {
		t.Fatalf("after the hand-off: %q", body)
	}
	if n := ts.handoffs(ReasonOtherRequest); n != 1 {
		t.Fatalf("%v hand-offs counted", n)
	}
}

func TestPipelinedAndSplit(t *testing.T) {
	ts := start(t, nil, nil)
	c := dial(t, ts.addr)
	// Three lookups in one write, then a hand-off: every answer in order.
	c.send(lookup("n=1", "a") + lookup("n=2", "bb") + lookup("n=3", "") + "GET /v4/x HTTP/1.1\r\nHost: h\r\n\r\n")
	for _, want := range []string{"fast q=n=1 b=a", "fast q=n=2 b=bb", "fast q=n=3 b=", "net/http GET /v4/x q= b="} {
		if _, body := c.answer(); body != want {
			t.Fatalf("%q, want %q", body, want)
		}
	}
	// A lookup written a few bytes at a time, its body in another write.
	c = dial(t, ts.addr)
	full := lookup("n=4", strings.Repeat("z", 900))
	for i := 0; i < len(full); i += 7 {
		c.send(full[i:min(i+7, len(full))])
	}
	if _, body := c.answer(); body != "fast q=n=4 b="+strings.Repeat("z", 900) {
		t.Fatalf("split: %q", body)
	}
	if n := ts.handoffs(ReasonOtherRequest); n != 1 {
		t.Fatalf("%v hand-offs", n)
	}
}

func TestNetHTTPAnswersWhatTheFrontDoesNot(t *testing.T) {
	ts := start(t, nil, nil)
	tests := []struct {
		name, req, status, body, reason string
	}{
		{"chunked", "POST " + testPath + " HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
			"200", "net/http POST " + testPath + " q= b=abc", ReasonHTTPFeature},
		{"body over the limit", lookup("", strings.Repeat("y", 2000)), "200", "net/http POST " + testPath + " q= b=" + strings.Repeat("y", 2000), ReasonLimit},
		{"head over the limit", lookup("", "", "X-Big: "+strings.Repeat("a", 9000)), "431", "", ReasonLimit},
		{"two lengths", "POST " + testPath + " HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "400", "", ReasonMalformed},
		{"HTTP/1.0", "POST " + testPath + " HTTP/1.0\r\nContent-Length: 1\r\n\r\nq", "200", "net/http POST " + testPath + " q= b=q", ReasonHTTPFeature},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := ts.handoffs(tc.reason)
			c := dial(t, ts.addr)
			c.send(tc.req)
			resp, body := c.answer()
			if got := fmt.Sprint(resp.StatusCode); got != tc.status || tc.body != "" && body != tc.body {
				t.Fatalf("%s %q", got, body)
			}
			if n := ts.handoffs(tc.reason) - before; n != 1 {
				t.Fatalf("%v hand-offs for %s", n, tc.reason)
			}
		})
	}
}

func TestConnectionClose(t *testing.T) {
	ts := start(t, nil, nil)
	c := dial(t, ts.addr)
	c.send(lookup("a=1", "x", "Connection: close"))
	resp, _ := c.answer()
	if !resp.Close {
		t.Fatal("no Connection: close")
	}
	if n, err := c.br.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("connection still open: %d %v", n, err)
	}
}

func TestTimeouts(t *testing.T) {
	ts := start(t, func(s *http.Server) { s.IdleTimeout, s.ReadHeaderTimeout = 300*time.Millisecond, 300*time.Millisecond }, nil)
	// Idle between requests: closed after IdleTimeout.
	c := dial(t, ts.addr)
	c.send(lookup("a=1", "x"))
	c.answer()
	if n, err := c.br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("idle connection still open: %d %v", n, err)
	}
	// A head that never ends: closed after ReadHeaderTimeout.
	c = dial(t, ts.addr)
	c.send("POST " + testPath + " HTTP/1.1\r\nHost: h\r\n")
	if n, err := c.br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("slow head still open: %d %v", n, err)
	}
	if ts.h.calls != 1 {
		t.Fatalf("%d calls", ts.h.calls)
	}
}

func TestShutdownFinishesRequests(t *testing.T) {
	ts := start(t, nil, nil)
	ts.h.hold, ts.h.held = make(chan struct{}), make(chan struct{}, 1)
	busy, idle, handed := dial(t, ts.addr), dial(t, ts.addr), dial(t, ts.addr)
	handed.send("GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
	handed.answer()
	idle.send(lookup("i=1", ""))
	<-ts.h.held
	ts.h.hold <- struct{}{}
	idle.answer()
	busy.send(lookup("b=1", "held"))
	<-ts.h.held
	shut := make(chan error, 1)
	go func() { shut <- ts.s.Shutdown(context.Background()) }()
	// The idle connection is closed; the busy one gets its answer.
	if n, err := idle.br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("idle connection open: %d %v", n, err)
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a request being served", err)
	default:
	}
	close(ts.h.hold)
	resp, body := busy.answer()
	if body != "fast q=b=1 b=held" || !resp.Close {
		t.Fatalf("%q close=%v", body, resp.Close)
	}
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	if _, err := net.Dial("tcp", ts.addr); err == nil {
		t.Fatal("still accepting")
	}
}

func TestCloseCancelsRequests(t *testing.T) {
	ts := start(t, nil, nil)
	ts.h.hold, ts.h.held = make(chan struct{}), make(chan struct{}, 1)
	c := dial(t, ts.addr)
	c.send(lookup("a=1", ""))
	<-ts.h.held
	if err := ts.s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := http.ReadResponse(c.br, nil); err == nil {
		t.Fatal("an answer after Close")
	}
}

func selfSigned(t *testing.T) (*tls.Config, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		NextProtos: []string{"h2", "http/1.1"}}, roots
}

func TestTLS(t *testing.T) {
	cfg, roots := selfSigned(t)
	ts := start(t, nil, cfg)
	// HTTP/1.1 over TLS: served here.
	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
	t.Cleanup(h1.CloseIdleConnections)
	t.Cleanup(h2.CloseIdleConnections)
	for _, tc := range []struct {
		tr    *http.Transport
		proto int
		want  string
	}{{h1, 1, "fast q=a=1 b=x"}, {h2, 2, "net/http POST " + testPath + " q=a=1 b=x"}} {
		resp, err := (&http.Client{Transport: tc.tr}).Post("https://"+ts.addr+testPath+"?a=1", "application/json", strings.NewReader("x"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != tc.proto || string(b) != tc.want {
			t.Fatalf("HTTP/%d %q, want HTTP/%d %q", resp.ProtoMajor, b, tc.proto, tc.want)
		}
	}
	// Plain HTTP to the TLS port: net/http's answer, as before.
	c := dial(t, ts.addr)
	c.send(lookup("a=1", "x"))
	if resp, _ := c.answer(); resp.StatusCode != 400 {
		t.Fatalf("plain HTTP to TLS: %d", resp.StatusCode)
	}
	if ts.handoffs(ReasonH2) != 1 || ts.handoffs(ReasonTLSError) != 1 {
		t.Fatalf("hand-offs: h2 %v, TLS errors %v", ts.handoffs(ReasonH2), ts.handoffs(ReasonTLSError))
	}
}

// serveFront serves cfg on a loopback listener until the test ends, and
// returns the server and its address.
func serveFront(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		<-done
	})
	return s, ln.Addr().String()
}
