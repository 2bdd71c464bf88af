package front

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"
)

// A connection's state, as Shutdown sees it.
const (
	stateIdle   int32 = iota // waiting for a request (or a TLS handshake)
	stateActive              // reading or serving a request
	stateClosed              // closed by Shutdown while idle
)

const (
	bufSize  = 4 << 10  // a connection's read buffer, as net/http's
	maxOut   = 64 << 10 // pipelined answers written at once, at most
	maxKeep  = 64 << 10 // larger buffers are dropped once used
	deadSlop = time.Second
)

// errStop ends a connection's loop without an error worth telling.
var errStop = errors.New("front: connection done")

// conn is one connection the front serves.
type conn struct {
	s     *Server
	nc    net.Conn
	buf   []byte // buf[r:w] is read and not yet served
	r, w  int
	out   []byte    // answers not yet written
	body  []byte    // the handler's answer
	hp    headParse // the head at c.r, as far as it is read
	watch watch     // the context of the request being served
	state atomic.Int32
	rdl   time.Time // the read deadline set on nc
	wdl   time.Time // the write deadline set on nc
}

// run serves c until it ends or is handed off.
func (c *conn) run(tc *tls.Conn) {
	defer c.s.live.Done()
	defer c.recover()
	reason := ""
	if tc != nil {
		reason = c.handshake(tc)
	}
	switch {
	case reason == ReasonTLSError && c.s.closing.Load():
		// Shutdown or Close ended the handshake: no failure to report.
		reason = ""
	case reason == "":
		reason = c.loop()
	}
	c.s.forget(c)
	if reason == "" {
		c.nc.Close()
		return
	}
	c.s.countHandoff(reason)
	c.nc.SetDeadline(time.Time{})
	var nc net.Conn = c.nc
	if c.r < c.w {
		nc = &prefixConn{Conn: c.nc, pending: c.buf[c.r:c.w]}
	}
	c.s.handoff.give(nc)
}

// recover ends c after a panic in the handler as net/http does: the
// panic is logged (but http.ErrAbortHandler) and the connection closed,
// and the server goes on serving the others.
func (c *conn) recover() {
	v := recover()
	if v == nil {
		return
	}
	if v != http.ErrAbortHandler {
		stack := make([]byte, 64<<10)
		stack = stack[:runtime.Stack(stack, false)]
		c.s.logf("front: panic serving %v: %v\n%s", c.nc.RemoteAddr(), v, stack)
	}
	c.watch.finish() // a request's watch ends with it
	c.s.forget(c)
	c.nc.Close()
}

// handshake completes a TLS handshake within the server's timeouts and
// returns a hand-off reason: HTTP/2, or a failed handshake, which
// net/http reports (it gets the same error) as it does its own.
func (c *conn) handshake(tc *tls.Conn) string {
	fb := c.s.cfg.Fallback
	to := time.Duration(0)
	for _, d := range []time.Duration{fb.ReadHeaderTimeout, fb.ReadTimeout, fb.WriteTimeout} {
		if d > 0 && (to == 0 || d < to) {
			to = d
		}
	}
	ctx := c.s.ctx
	if to > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, to)
		defer cancel()
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return ReasonTLSError
	}
	if tc.ConnectionState().NegotiatedProtocol == "h2" {
		return ReasonH2
	}
	return ""
}

// loop serves requests until the connection ends (""), or returns the
// reason for handing it off with the bytes read from c.r on.
func (c *conn) loop() string {
	for {
		h, v, why, err := c.next()
		if err != nil {
			return ""
		}
		if v == handOff {
			if c.flush() != nil {
				return ""
			}
			return why
		}
		if err := c.readBody(h); err != nil {
			return ""
		}
		if c.answer(h) {
			c.flush()
			return ""
		}
		if len(c.out) >= maxOut && c.flush() != nil {
			return ""
		}
	}
}

// next reads until the request at c.r has a whole head (or is to be
// handed off), and judges it. Before any read it writes the answers
// pending, so a client never waits for an answer the front holds.
func (c *conn) next() (head, verdict, string, error) {
	var started time.Time
	for {
		if c.r < c.w {
			h, v, why := c.hp.parse(c.buf[c.r:c.w], c.s.cfg.Path, c.s.maxHead, c.s.cfg.MaxBodyBytes)
			if v != needMore {
				c.hp = headParse{}
				return h, v, why, nil
			}
		}
		if err := c.flush(); err != nil {
			return head{}, 0, "", err
		}
		var dl time.Time
		var d time.Duration
		fb := c.s.cfg.Fallback
		if c.r == c.w {
			c.r, c.w = 0, 0
			// An idle connection keeps no more than net/http's.
			if len(c.buf) > bufSize {
				c.buf = make([]byte, bufSize)
			}
			if cap(c.out) > bufSize {
				c.out = nil
			}
			if cap(c.body) > bufSize {
				c.body = nil
			}
			c.state.Store(stateIdle)
			if c.s.closing.Load() {
				return head{}, 0, "", errStop
			}
			if d = c.s.idle; d > 0 {
				dl = time.Now().Add(d)
			}
		} else {
			if started.IsZero() {
				started = time.Now()
			}
			if d = fb.ReadHeaderTimeout; d <= 0 {
				d = fb.ReadTimeout
			}
			if d > 0 {
				dl = started.Add(d)
			}
		}
		if err := c.read(dl, d, c.w-c.r+1); err != nil {
			return head{}, 0, "", err
		}
	}
}

// readBody reads until the body of the request at c.r is in the buffer.
func (c *conn) readBody(h head) error {
	need := h.size + h.bodyLen
	if c.w-c.r >= need {
		return nil
	}
	var dl time.Time
	d := c.s.cfg.Fallback.ReadTimeout
	if d > 0 {
		dl = time.Now().Add(d)
	}
	for c.w-c.r < need {
		if err := c.flush(); err != nil {
			return err
		}
		if err := c.read(dl, d, need); err != nil {
			return err
		}
	}
	return nil
}

// answer serves the request at c.r and queues its answer; it reports
// whether the connection ends after it.
func (c *conn) answer(h head) (last bool) {
	b := c.buf[c.r : c.r+h.size+h.bodyLen]
	query := b[h.queryAt : h.queryAt+h.query]
	c.watch.begin(c.r+len(b) < c.w)
	c.body = c.s.cfg.Handler.ServeFast(&c.watch, unsafe.String(unsafe.SliceData(query), len(query)), b[h.size:], c.body[:0])
	peek, peeked, gone := c.watch.finish()
	c.r += len(b)
	if peeked {
		c.keep(peek)
	}
	last = h.close || gone || c.s.closing.Load()
	c.out = appendResponse(c.out, c.body, time.Now(), last)
	if cap(c.body) > maxKeep {
		c.body = nil
	}
	return last
}

// keep appends b, read by the watch, to the bytes read.
func (c *conn) keep(b byte) {
	if c.w == len(c.buf) {
		nb := c.buf
		if c.r == 0 {
			nb = make([]byte, 2*len(c.buf))
		}
		c.w = copy(nb, c.buf[c.r:c.w])
		c.buf, c.r = nb, 0
	}
	c.buf[c.w] = b
	c.w++
}

// read reads more into the buffer, with the read deadline dl (zero:
// none; d is the timeout it was made of), making room for need bytes
// from c.r: it moves them to the front, or into a larger buffer (a head
// grows up to the head limit; a body gets what it needs up to 64 KiB,
// and beyond that doubles once the buffer is full: a Content-Length costs
// memory only as its bytes arrive).
func (c *conn) read(dl time.Time, d time.Duration, need int) error {
	switch {
	case need <= len(c.buf)-c.r: // room as it is
	case need <= len(c.buf) || need > maxKeep && c.r > 0:
		c.w = copy(c.buf, c.buf[c.r:c.w])
		c.r = 0
	case need > maxKeep && c.w < len(c.buf): // fill it first
	default:
		b := make([]byte, max(min(2*len(c.buf), c.s.maxHead+1), min(need, max(2*len(c.buf), maxKeep))))
		c.w = copy(b, c.buf[c.r:c.w])
		c.buf, c.r = b, 0
	}
	if !near(c.rdl, dl, d) {
		if err := c.nc.SetReadDeadline(dl); err != nil {
			return err
		}
		c.rdl = dl
	}
	n, err := c.nc.Read(c.buf[c.w:])
	if n > 0 && c.state.Load() != stateActive && !c.state.CompareAndSwap(stateIdle, stateActive) {
		return errStop // Shutdown closed it as idle
	}
	c.w += n
	if n > 0 {
		return nil
	}
	return err
}

// flush writes the answers pending.
func (c *conn) flush() error {
	if len(c.out) == 0 {
		return nil
	}
	if d := c.s.cfg.Fallback.WriteTimeout; d > 0 {
		if dl := time.Now().Add(d); !near(c.wdl, dl, d) {
			if err := c.nc.SetWriteDeadline(dl); err != nil {
				return err
			}
			c.wdl = dl
		}
	}
	_, err := c.nc.Write(c.out)
	if cap(c.out) > maxKeep {
		c.out = nil
	} else {
		c.out = c.out[:0]
	}
	return err
}

// near reports whether the deadline set, cur, can stand for want, made
// of the timeout d: the same, or sooner by at most deadSlop or an eighth
// of d, whichever is less. Moving a deadline costs a timer update, so a
// busy connection moves it about once a second; a timeout under a second
// still never cuts a busy connection (a deadline a second stale may
// already have passed).
func near(cur, want time.Time, d time.Duration) bool {
	if cur.IsZero() || want.IsZero() {
		return cur.IsZero() == want.IsZero()
	}
	return !cur.After(want) && want.Sub(cur) <= min(deadSlop, d/8)
}
