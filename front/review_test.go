package front

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

// A head claiming a large body costs the server memory only as the body's
// bytes arrive: an unauthenticated client sending heads with Content-Length
// at the limit (and then nothing) on many connections must not make the
// front hold the limit for each (net/http's handler grows its buffer as
// bytes are read, and refuses a bad query before reading the body at all).
func TestBodyBufferGrowsWithBytesRead(t *testing.T) {
	s, err := New(Config{Path: testPath, Handler: &echo{}, Fallback: &http.Server{}, MaxBodyBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := &conn{s: s, nc: a, buf: make([]byte, bufSize)}
	head := "POST " + testPath + " HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n"
	go b.Write([]byte(head + "0123456789"))
	h, v, _, err := c.next()
	if err != nil || v != serve || h.bodyLen != 1<<20 {
		t.Fatalf("head: %v %v %+v", err, v, h)
	}
	go b.Write([]byte("0123456789"))
	if err := c.read(time.Time{}, 0, h.size+h.bodyLen); err != nil {
		t.Fatal(err)
	}
	if c.w-c.r != len(head)+20 || len(c.buf) > maxKeep {
		t.Fatalf("after %d bytes of a 1 MiB body the buffer holds %d bytes", c.w-c.r-len(head), len(c.buf))
	}
	// The whole body still arrives, however it is split.
	body := strings.Repeat("x", 1<<20-20)
	go b.Write([]byte(body))
	for c.w-c.r < h.size+h.bodyLen {
		if err := c.read(time.Time{}, 0, h.size+h.bodyLen); err != nil {
			t.Fatal(err)
		}
	}
	if c.w-c.r != h.size+h.bodyLen || string(c.buf[c.r+h.size+20:c.w]) != body {
		t.Fatalf("body: %d bytes", c.w-c.r-h.size)
	}
}

// panicky panics on a body "panic", and echoes otherwise.
type panicky struct {
	echo
	done <-chan struct{}
}

func (p *panicky) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	switch string(body) {
	case "panic":
		panic("handler bug")
	case "wait, then panic": // its context's watch started
		p.mu.Lock()
		p.done = ctx.Done()
		p.mu.Unlock()
		panic("handler bug")
	}
	return p.echo.ServeFast(ctx, rawQuery, body, out)
}

// A panic in the handler ends its connection, as net/http's recovery
// does, not the process: the server goes on serving others, and the panic
// is logged.
func TestHandlerPanicClosesOnlyItsConnection(t *testing.T) {
	var logged bytes.Buffer
	var mu sync.Mutex
	fb := &http.Server{Handler: http.HandlerFunc(fallbackHandler),
		ErrorLog: log.New(writerFunc(func(b []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logged.Write(b) }), "", 0)}
	h := &panicky{}
	_, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: fb})
	c := dial(t, addr)
	c.send(lookup("a=1", "panic"))
	if _, err := http.ReadResponse(c.br, nil); err == nil {
		t.Fatal("an answer to a request whose handler panicked")
	}
	c2 := dial(t, addr)
	c2.send(lookup("a=2", "x"))
	if _, body := c2.answer(); body != "fast q=a=2 b=x" {
		t.Fatalf("after a panic: %q", body)
	}
	mu.Lock()
	if !strings.Contains(logged.String(), "panic serving") || !strings.Contains(logged.String(), "handler bug") {
		t.Fatalf("log: %q", logged.String())
	}
	mu.Unlock()
	// A handler that asked for Done, then panicked: its request's
	// context ends with the connection, not with the server (here with a
	// pipelined request behind it, so no background read would end it).
	c3 := dial(t, addr)
	c3.send(lookup("a=3", "wait, then panic") + lookup("a=4", "x"))
	if _, err := http.ReadResponse(c3.br, nil); err == nil {
		t.Fatal("an answer to a request whose handler panicked")
	}
	h.mu.Lock()
	d := h.done
	h.mu.Unlock()
	select {
	case <-d:
	case <-time.After(10 * time.Second):
		t.Fatal("the context of a request whose handler panicked is still live")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// If Fallback refuses to serve (here http2's setup fails on the cipher
// suites), Serve returns its error, as http.Server.Serve would, instead of
// serving on with every hand-off waiting forever for a server that is
// gone (a goroutine and a connection held per hand-off).
func TestFallbackFailureEndsServe(t *testing.T) {
	fb := &http.Server{Handler: http.HandlerFunc(fallbackHandler), TLSConfig: &tls.Config{
		CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_CBC_SHA}, NextProtos: []string{"h2"}}}
	s, err := New(Config{Path: testPath, Handler: &echo{}, Fallback: fb})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	defer s.Close()
	select {
	case err := <-done:
		if err == nil || errors.Is(err, http.ErrServerClosed) || !strings.Contains(err.Error(), "http2") {
			t.Fatalf("Serve returned %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Serve goes on without its fallback")
	}
}

// ServeTLS's handshakes do not share Fallback.TLSConfig with
// Fallback.Serve, which sets HTTP/2 up on it (appending "http/1.1" to
// NextProtos, setting PreferServerCipherSuites) in its own goroutine, as
// the front starts serving: a data race under -race. net/http's ServeTLS
// hands its listener a clone.
func TestTLSConfigNotSharedWithFallbackSetup(t *testing.T) {
	cfg, roots := selfSigned(t)
	cfg.NextProtos = []string{"h2"}
	ts := start(t, nil, cfg)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Post("https://"+ts.addr+testPath+"?a=1", "application/json", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "fast q=a=1 b=x" {
		t.Fatalf("%q", b)
	}
}

// A head parsed as it arrives (the lines read before are not read again)
// gets the verdict parseHead gives the same bytes at every step, however
// they are split; and the lines read are remembered, so a head sent a
// line at a time costs its length (a 64 KiB head took 250 µs per parse,
// once per read, before).
func TestHeadParsedAsItArrives(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 5000 {
		b := sample(rng)
		if rng.IntN(2) == 0 {
			b = mutate(rng, b)
		}
		maxHead := 64 + rng.IntN(256)
		var p headParse
		for n := 1 + rng.IntN(8); ; n = min(len(b), n+1+rng.IntN(16)) {
			h1, v1, why1 := p.parse(b[:n], testPath, maxHead, 1<<20)
			h2, v2, why2 := parseHead(b[:n], testPath, maxHead, 1<<20)
			if v1 != v2 || why1 != why2 || v1 == serve && h1 != h2 {
				t.Fatalf("%q: resumed %v %s %+v, whole %v %s %+v", b[:n], v1, why1, h1, v2, why2, h2)
			}
			if v1 != needMore || n == len(b) {
				break
			}
		}
	}
	var p headParse
	head := "POST " + testPath + " HTTP/1.1\r\nHost: h\r\n" + strings.Repeat("a:b\r\n", 100)
	if _, v, _ := p.parse([]byte(head), testPath, 4096, 1024); v != needMore || p.at != len(head) {
		t.Fatalf("%v: %d of %d bytes remembered", v, p.at, len(head))
	}
}

// A connection whose TLS handshake has not ended when Shutdown (or Close)
// closes it is not handed to net/http as a failed handshake: that counted
// a tls_error and logged "TLS handshake error ... use of closed network
// connection" for every client connecting as the proxy stops.
func TestShutdownDuringHandshakeNotAFailure(t *testing.T) {
	cfg, _ := selfSigned(t)
	var logged bytes.Buffer
	var mu sync.Mutex
	ts := start(t, func(s *http.Server) {
		s.ErrorLog = log.New(writerFunc(func(b []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logged.Write(b) }), "", 0)
	}, cfg)
	c := dial(t, ts.addr) // connected, no ClientHello yet
	wait.For(t, 10*time.Second, "the connection accepted", func() bool {
		ts.s.mu.Lock()
		defer ts.s.mu.Unlock()
		return len(ts.s.conns) == 1
	})
	if err := ts.s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n, err := c.br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("connection open after Shutdown: %d %v", n, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := ts.handoffs(ReasonTLSError); n != 0 || logged.Len() != 0 {
		t.Fatalf("%v tls_error hand-offs, log %q", n, logged.String())
	}
}

// ctxWatch holds every call until its ctx ends or it is released, and
// tells whether the ctx ended.
type ctxWatch struct {
	held    chan struct{}
	release chan struct{}
	ended   chan struct{}
}

func (w *ctxWatch) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	w.held <- struct{}{}
	select {
	case <-ctx.Done():
		close(w.ended)
	case <-w.release:
	}
	return append(out, "x"...)
}

// A lookup waiting on the upstream whose caller went away is cancelled,
// as net/http cancels r.Context(): the batcher then drops the caller's
// accounts from the batch (batcher's live) instead of spending the
// upstream quota on them; under overload (callers timing out at 1 s, as
// in issue 17) the front spends it on callers who left, for up to the
// request timeout.
func TestCallerLeavingCancelsLookup(t *testing.T) {
	w := &ctxWatch{held: make(chan struct{}, 1), release: make(chan struct{}), ended: make(chan struct{})}
	_, addr := serveFront(t, Config{Path: testPath, Handler: w, Fallback: &http.Server{}})
	defer func() {
		close(w.release)
	}()
	c := dial(t, addr)
	c.send(lookup("a=1", "x"))
	<-w.held
	c.c.Close()
	select {
	case <-w.ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the lookup of a caller who left goes on")
	}
}

// holdOn holds a call whose body is "wait" until released; others are
// answered at once.
type holdOn struct {
	held, release chan struct{}
}

func (h *holdOn) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	if string(body) == "wait" {
		// As a lookup waits: on its context too.
		h.held <- struct{}{}
		select {
		case <-h.release:
		case <-ctx.Done():
		}
	}
	return fmt.Appendf(out, "q=%s", rawQuery)
}

// Pipelined requests: the answer to the first is written once it is
// ready, as net/http writes each answer when its handler returns, not held
// until a later request's lookup (waiting on the upstream, up to the
// request timeout) is answered too.
func TestPipelinedAnswerNotHeldBehindWaitingLookup(t *testing.T) {
	h := &holdOn{held: make(chan struct{}, 1), release: make(chan struct{})}
	_, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	defer close(h.release)
	c := dial(t, addr)
	c.send(lookup("n=1", "now") + lookup("n=2", "wait"))
	<-h.held
	c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, body := c.answer(); body != "q=n=1" {
		t.Fatalf("%q", body)
	}
}

// A deadline is kept while near the one wanted, but never one that may
// have passed: with a timeout under a second (IdleTimeout or WriteTimeout
// of 300 ms), a deadline set 500 ms ago for a busy connection stood for
// the new one, so the next read or write failed at once and the
// connection was cut while in use.
func TestNearDeadlineNeverStale(t *testing.T) {
	t0 := time.Now()
	for _, tc := range []struct {
		cur, want time.Duration
		d         time.Duration
		near      bool
	}{
		{0, 500 * time.Millisecond, 300 * time.Millisecond, false}, // cur has passed by the time want is asked
		{0, 30 * time.Millisecond, 300 * time.Millisecond, true},
		{0, 900 * time.Millisecond, 120 * time.Second, true},
		{0, 1100 * time.Millisecond, 120 * time.Second, false},
		{time.Second, 0, 120 * time.Second, false}, // later than wanted: never
	} {
		if got := near(t0.Add(tc.cur), t0.Add(tc.want), tc.d); got != tc.near {
			t.Errorf("near(+%v, +%v, %v) = %v", tc.cur, tc.want, tc.d, got)
		}
	}
}

// A client that stops reading its answers does not hold a goroutine past
// WriteTimeout: the write fails and the connection ends.
func TestClientNotReadingEndsAtWriteTimeout(t *testing.T) {
	ts := start(t, func(s *http.Server) { s.WriteTimeout = 300 * time.Millisecond }, nil)
	c := dial(t, ts.addr)
	req := lookup("a=1", strings.Repeat("z", 1000))
	go func() {
		for {
			if _, err := io.WriteString(c.c, req); err != nil {
				return
			}
		}
	}()
	wait.For(t, 20*time.Second, "the connection ended", func() bool {
		ts.h.mu.Lock()
		calls := ts.h.calls
		ts.h.mu.Unlock()
		ts.s.mu.Lock()
		defer ts.s.mu.Unlock()
		return calls > 0 && len(ts.s.conns) == 0
	})
}

// Over TLS, a connection the front served is handed to net/http in the
// middle (another API), which serves it from then on.
func TestTLSHandedOffMidConnection(t *testing.T) {
	cfg, roots := selfSigned(t)
	ts := start(t, nil, cfg)
	tc, err := tls.Dial("tcp", ts.addr, &tls.Config{RootCAs: roots, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(20 * time.Second))
	c := &client{t: t, c: tc, br: bufio.NewReader(tc)}
	c.send(lookup("n=1", "a") + "POST /v4/other HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab")
	c.send("cde" + lookup("n=2", "b"))
	for _, want := range []string{"fast q=n=1 b=a", "net/http POST /v4/other q= b=abcde", "net/http POST " + testPath + " q=n=2 b=b"} {
		if _, body := c.answer(); body != want {
			t.Fatalf("%q, want %q", body, want)
		}
	}
}

// bigAnswer answers every call with 60 KiB.
type bigAnswer struct{ calls atomic.Int32 }

func (b *bigAnswer) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	b.calls.Add(1)
	return append(out, strings.Repeat("x", 60<<10)...)
}

// An idle keep-alive connection holds no more than net/http's (a 4 KiB
// reader and writer): a thousand app-server connections that each once
// got a large answer must not keep 128 KiB apiece (c.out and c.body are
// kept up to 64 KiB each, per connection, for its lifetime).
func TestIdleConnectionKeepsLittle(t *testing.T) {
	h := &bigAnswer{}
	s, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	c := dial(t, addr)
	c.send(lookup("a=1", "x"))
	c.answer()
	var kept int
	wait.For(t, 10*time.Second, "the connection idle", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for cn := range s.conns {
			if h.calls.Load() == 1 && cn.state.Load() == stateIdle {
				kept = cap(cn.out) + cap(cn.body) + len(cn.buf)
				return true
			}
		}
		return false
	})
	if kept > 16<<10 {
		t.Fatalf("an idle connection keeps %d bytes", kept)
	}
}
