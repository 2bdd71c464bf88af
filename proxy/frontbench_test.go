package proxy_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/front"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// BenchmarkHitPathFront measures one single-account lookup answered from
// the in-process tier through the API listener's front, as a keep-alive
// client sends it: a request's bytes in, one read; the answer's bytes
// out, one write; over an in-memory connection, so allocs/op is all the
// proxy allocates per lookup, the HTTP layer included.
func BenchmarkHitPathFront(b *testing.B) {
	sim, srv := simtest.Start(b, imsim.Config{})
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(),
		SecretKey: sim.Key(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	stop := runProxy(b, p)
	defer stop()
	h := p.Handler()
	fs, err := front.New(front.Config{Path: im.PathGet, Handler: h.(front.Handler), Fallback: &http.Server{Handler: h}})
	if err != nil {
		b.Fatal(err)
	}
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`
	req := fmt.Appendf(nil, "POST %s?sdkappid=1400000000&identifier=administrator&random=1&contenttype=json&usersig=%s HTTP/1.1\r\n"+
		"Host: proxy\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", im.PathGet, url.QueryEscape(signFor(sim)), len(body), body)
	c := &memConn{req: req, in: make(chan struct{}), out: make(chan struct{}), closed: make(chan struct{}), kick: make(chan struct{})}
	served := make(chan error, 1)
	go func() { served <- fs.Serve(&oneConnListener{c: c, done: make(chan struct{})}) }()
	defer func() { fs.Close(); <-served }()
	for i := range b.N + 1 {
		if i == 1 {
			b.ReportAllocs()
			b.ResetTimer()
		}
		c.in <- struct{}{}
		<-c.out
		if !bytes.HasPrefix(c.last, []byte("HTTP/1.1 200 OK\r\n")) || !bytes.Contains(c.last, []byte("nick-user1")) {
			b.Fatalf("answer %q", c.last)
		}
	}
}

// memConn is a client connection in memory: each Read gets req once the
// benchmark sends on in; each Write is copied into last and told on out.
// A read deadline in the past ends a pending or later Read, as a socket's
// does (the front ends its background read so).
type memConn struct {
	req     []byte
	in, out chan struct{}
	last    []byte
	closed  chan struct{}
	once    sync.Once
	mu      sync.Mutex
	expired bool
	kick    chan struct{}
}

func (c *memConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	expired, kick := c.expired, c.kick
	c.mu.Unlock()
	if expired {
		return 0, os.ErrDeadlineExceeded
	}
	select {
	case <-c.in:
		return copy(p, c.req), nil
	case <-kick:
		return 0, os.ErrDeadlineExceeded
	case <-c.closed:
		return 0, io.EOF
	}
}

func (c *memConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.expired = !t.IsZero() && t.Before(time.Now())
	if c.expired {
		close(c.kick)
		c.kick = make(chan struct{})
	}
	return nil
}

func (c *memConn) Write(p []byte) (int, error) {
	c.last = append(c.last[:0], p...)
	c.out <- struct{}{}
	return len(p), nil
}

func (c *memConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

func (c *memConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }
func (c *memConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 2} }
func (c *memConn) SetDeadline(t time.Time) error    { return c.SetReadDeadline(t) }
func (c *memConn) SetWriteDeadline(time.Time) error { return nil }

// oneConnListener accepts c once, then nothing until closed.
type oneConnListener struct {
	c    net.Conn
	done chan struct{}
	n    int
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if l.n == 0 {
		l.n++
		return l.c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.c.LocalAddr() }
