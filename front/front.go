// Package front serves the API listener: the lookup endpoint on a lean
// HTTP/1.1 loop, every other request by a net/http Server, unchanged.
//
// Nearly all of a proxy's traffic is one request shape — a small POST of
// portrait_get on a keep-alive connection — and answering it from the
// in-process tier takes about a microsecond, while net/http spends many
// more on every request: a goroutine and a deadline pair for its
// background read, header maps, a context, a flush. The front reads such
// requests itself: one read, one parse of the head over the connection's
// own buffer, the handler's answer appended after a fixed head, one
// write (requests a client pipelines are answered in one write). Its
// deadlines are moved at most once a second while a connection is busy.
//
// Anything else — another path or method, HTTP/1.0, chunked bodies,
// Expect, Upgrade, HTTP/2 over TLS, a head or body over the limits, any
// byte net/http might read otherwise — hands the connection, with the
// bytes already read of it, to the net/http Server (Config.Fallback),
// which serves it from that request on as if it had accepted it: so the
// front never answers a request net/http would frame or refuse
// differently, and every rarer behaviour is net/http's.
//
// A request's context is the server's until the handler asks for its
// Done channel, which a lookup does only when it is about to wait: then
// the front writes the answers it holds and, once the lookup has waited
// 250 ms, reads the connection in the background, as net/http does for
// every request, and the context ends if the client goes away. A hit, or
// a lookup answered sooner, pays for none of it. Server is safe for
// concurrent use; Serve or ServeTLS is called once.
package front

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Handler answers the requests the front serves itself.
type Handler interface {
	// ServeFast appends to out the JSON answer to a POST of body with
	// rawQuery (without the '?') on the front's path, and returns it; it
	// is sent with HTTP status 200. rawQuery and body alias the
	// connection's buffer: they are valid only during the call, and
	// nothing of them may be kept after it. ctx ends when the server is
	// closed, when the handler returns or, once the handler has asked for
	// ctx.Done (as it must before it waits), when the client goes away:
	// asking makes the front write the answers it holds and watch the
	// connection. ctx also has WithDeadline(d) (context.Context,
	// context.CancelFunc): asked before ctx.Done, it starts ctx itself
	// with deadline d (one context, not two) and returns it, with a
	// CancelFunc that does nothing (ctx ends with the request); asked
	// after, it is context.WithDeadline of ctx. ctx is the connection's,
	// serving one request after another: a context kept past its request
	// must not be asked anything.
	ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte
}

// Config configures a Server. Path, Handler and Fallback are required.
type Config struct {
	// Path is the path whose POSTs the front answers, e.g.
	// "/v4/profile/portrait_get".
	Path    string
	Handler Handler
	// Fallback serves every connection the front hands off. Its
	// ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout and
	// MaxHeaderBytes apply to the front's connections too (zero: no
	// timeout; http.DefaultMaxHeaderBytes), and its TLSConfig to
	// ServeTLS (list "h2" in NextProtos to offer HTTP/2, which Fallback
	// serves).
	Fallback *http.Server
	// MaxBodyBytes: a request with a longer body is handed off, for the
	// handler's own limit to answer. Zero means 1 MiB.
	MaxBodyBytes int64
	// Handoffs, if set, counts connections handed off, by reason (one of
	// Reasons).
	Handoffs *prometheus.CounterVec
}

// Server is the API listener's server. Create it with New.
type Server struct {
	cfg      Config
	maxHead  int
	idle     time.Duration // wait for a request between two
	ctx      context.Context
	cancel   context.CancelFunc
	handoff  *handoffListener
	handoffs map[string]prometheus.Counter

	closing atomic.Bool
	mu      sync.Mutex
	ln      net.Listener
	conns   map[*conn]struct{}
	live    sync.WaitGroup // the accept loop and the connections' goroutines
	served  chan struct{}  // closed when the accept loop has ended
	fbErr   chan error     // Fallback.Serve's result
	fbOnce  sync.Once      // fbErr is read once
	stopErr error          // why Serve stopped (not closing); under mu
}

// New validates cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Path == "" || cfg.Path[0] != '/' || cfg.Handler == nil || cfg.Fallback == nil {
		return nil, errors.New("front: Config needs a Path starting with /, a Handler and a Fallback")
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 1 << 20
	}
	s := &Server{cfg: cfg, maxHead: cfg.Fallback.MaxHeaderBytes, idle: cfg.Fallback.IdleTimeout,
		conns: map[*conn]struct{}{}, served: make(chan struct{}), fbErr: make(chan error, 1),
		handoffs: map[string]prometheus.Counter{}}
	if s.maxHead <= 0 {
		s.maxHead = http.DefaultMaxHeaderBytes
	}
	if s.idle <= 0 {
		s.idle = cfg.Fallback.ReadTimeout // as net/http
	}
	for _, r := range Reasons {
		if cfg.Handoffs != nil {
			s.handoffs[r] = cfg.Handoffs.WithLabelValues(r)
		}
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Serve accepts connections on ln until Shutdown or Close, and returns
// http.ErrServerClosed then, or the listener's error. It closes ln.
func (s *Server) Serve(ln net.Listener) error { return s.serve(ln, nil) }

// ServeTLS is Serve for TLS connections, with Fallback.TLSConfig.
func (s *Server) ServeTLS(ln net.Listener) error {
	cfg := s.cfg.Fallback.TLSConfig
	if cfg == nil || len(cfg.Certificates) == 0 && cfg.GetCertificate == nil && cfg.GetConfigForClient == nil {
		ln.Close()
		return errors.New("front: ServeTLS needs Fallback.TLSConfig with a certificate")
	}
	// A clone, as net/http's ServeTLS takes: Fallback.Serve sets HTTP/2
	// up on Fallback.TLSConfig in its own goroutine while the front
	// handshakes.
	cfg = cfg.Clone()
	if !slices.Contains(cfg.NextProtos, "http/1.1") {
		cfg.NextProtos = append(cfg.NextProtos, "http/1.1")
	}
	return s.serve(ln, cfg)
}

func (s *Server) serve(ln net.Listener, tlsCfg *tls.Config) error {
	s.mu.Lock()
	switch {
	case s.closing.Load():
		s.mu.Unlock()
		ln.Close()
		return http.ErrServerClosed
	case s.ln != nil:
		s.mu.Unlock()
		ln.Close()
		return errors.New("front: Serve called twice")
	}
	s.ln = ln
	s.handoff = &handoffListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
	s.live.Add(1)
	s.mu.Unlock()
	go s.serveFallback(ln)
	err := s.accept(ln, tlsCfg)
	close(s.served)
	s.live.Done()
	if s.closing.Load() {
		return http.ErrServerClosed
	}
	// The listener (or Fallback) failed: stop taking connections, and
	// let those handed off run to their end, as net/http's Serve does.
	err = s.stop(err, nil)
	s.handoff.Close()
	s.fallbackDone()
	return err
}

// serveFallback runs Fallback on the connections handed off. Should it
// return while the front serves (it refused to start: say an HTTP/2
// setup error), hand-offs are closed from then on instead of waiting for
// it forever, and Serve returns its error.
func (s *Server) serveFallback(ln net.Listener) {
	err := s.cfg.Fallback.Serve(s.handoff)
	s.handoff.Close()
	if !errors.Is(err, http.ErrServerClosed) {
		s.stop(fmt.Errorf("front: fallback server: %w", err), ln)
	}
	s.fbErr <- err
}

// stop records err as why Serve stops, unless a reason came first, and
// closes ln if given; it returns the reason recorded.
func (s *Server) stop(err error, ln net.Listener) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopErr == nil {
		s.stopErr = err
		if ln != nil {
			ln.Close()
		}
	}
	return s.stopErr
}

// accept runs the accept loop, retrying temporary errors as net/http
// does.
func (s *Server) accept(ln net.Listener, tlsCfg *tls.Config) error {
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return nil
			}
			if t, ok := err.(interface{ Temporary() bool }); ok && t.Temporary() { // EMFILE and the like
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		c := &conn{s: s, nc: nc, buf: make([]byte, bufSize)}
		c.watch.c = c
		var tc *tls.Conn
		if tlsCfg != nil {
			tc = tls.Server(nc, tlsCfg)
			c.nc = tc
		}
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			nc.Close()
			continue
		}
		s.conns[c] = struct{}{}
		s.live.Add(1)
		s.mu.Unlock()
		go c.run(tc)
	}
}

// Shutdown stops the server gracefully, as http.Server.Shutdown does: it
// closes the listener, closes connections as they become idle, lets
// every request being served finish (each gets its answer, the last on a
// connection with Connection: close), then shuts Fallback down with the
// connections handed to it. If ctx ends first, it closes what is left
// and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing.Store(true)
	ln := s.ln
	s.mu.Unlock()
	if ln == nil {
		return s.cfg.Fallback.Shutdown(ctx)
	}
	ln.Close()
	<-s.served
	wait := time.Millisecond
	for s.closeIdle() > 0 {
		select {
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 100*time.Millisecond)
	}
	s.live.Wait()
	err := s.cfg.Fallback.Shutdown(ctx)
	s.fallbackDone()
	return err
}

// Close closes the listener and every connection at once, and Fallback
// with its own (http.Server.Close); requests being served see their
// context cancelled.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closing.Store(true)
	ln := s.ln
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.cancel() // a request's context started after this starts ended
	s.mu.Lock()
	for c := range s.conns {
		c.watch.abort() // requests' contexts do not derive from s.ctx
	}
	s.mu.Unlock()
	if ln == nil {
		return s.cfg.Fallback.Close()
	}
	ln.Close()
	<-s.served
	err := s.cfg.Fallback.Close()
	s.live.Wait()
	s.fallbackDone()
	return err
}

// fallbackDone waits for Fallback.Serve to return.
func (s *Server) fallbackDone() { s.fbOnce.Do(func() { <-s.fbErr }) }

// closeIdle closes the connections waiting for a request and returns how
// many are left (serving one).
func (s *Server) closeIdle() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.state.CompareAndSwap(stateIdle, stateClosed) {
			c.nc.Close()
		}
	}
	return len(s.conns)
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// logf logs with Fallback.ErrorLog, or the log package's logger.
func (s *Server) logf(format string, args ...any) {
	if l := s.cfg.Fallback.ErrorLog; l != nil {
		l.Printf(format, args...)
		return
	}
	log.Printf(format, args...)
}

func (s *Server) countHandoff(reason string) {
	if c := s.handoffs[reason]; c != nil {
		c.Inc()
	}
}

// handoffListener is the listener Fallback serves: it yields the
// connections the front hands off.
type handoffListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// give hands c to Fallback; false if it no longer accepts (c is closed).
func (l *handoffListener) give(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		c.Close()
		return false
	}
}

// prefixConn is a connection handed off with bytes already read of it.
type prefixConn struct {
	net.Conn
	pending []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// CloseWrite lets net/http half-close a TCP connection as it does its
// own.
func (c *prefixConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
