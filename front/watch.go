package front

import (
	"context"
	"sync"
	"time"
)

// aLongTimeAgo is a deadline that has passed: it ends a pending read.
var aLongTimeAgo = time.Unix(1, 0)

// watch is the context of the request a connection is serving: the
// server's own, until the handler asks for Done, which a lookup does only
// when it is about to wait. Then, as net/http does for every request, the
// front writes the answers it holds (earlier pipelined ones, which must
// not wait behind this one) and reads the connection in the background:
// the context ends when the client goes away, and the lookup stops
// spending quota on it. A byte that read gets is kept for the next
// request. A hit never asks, and pays for none of this.
//
// The started context is made from context.Background, so it registers
// with nothing shared, as a context of the server's would (a lock and a
// map entry on one context for every waiting request of every
// connection): Server.Close ends the ones in force itself. Its Value
// gives its own cancelCtx, so a context derived from the watch registers
// with that directly (no goroutine), and the handler gets it with its
// deadline from WithDeadline, one context instead of two.
type watch struct {
	c      *conn
	mu     sync.Mutex
	active bool // the handler is running
	more   bool // bytes of a later request are already read
	ctx    context.Context
	cancel context.CancelFunc
	timer  *time.Timer   // starts the background read after watchDelay
	gen    uint64        // the request's number on the connection
	done   chan struct{} // closed when the background read ends
	stop   bool          // the read is being ended by finish
	peeked bool          // the read got a byte, b
	b      [1]byte
	gone   bool // the client closed the connection (or writing failed)
}

func (w *watch) Deadline() (time.Time, bool) { return w.current().Deadline() }

func (w *watch) Done() <-chan struct{} { return w.start(time.Time{}).Done() }

func (w *watch) Err() error { return w.current().Err() }

func (w *watch) Value(key any) any { return w.current().Value(key) }

// current is the context in force: the started one, or the server's.
func (w *watch) current() context.Context {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ctx != nil {
		return w.ctx
	}
	return w.c.s.ctx
}

// begin readies w for a request; more says bytes after it are read.
func (w *watch) begin(more bool) {
	w.mu.Lock()
	w.active, w.more = true, more
	w.mu.Unlock()
}

// WithDeadline is context.WithDeadline(w, d) made as one context when the
// handler asks before anything started the request's context (the HTTP
// handler does, when a lookup may wait): the request's own, started with
// deadline d. Its CancelFunc does nothing: the context ends with the
// request, as w's own. Otherwise it is WithDeadline of the context in
// force.
func (w *watch) WithDeadline(d time.Time) (context.Context, context.CancelFunc) {
	ctx := w.start(d)
	if dl, ok := ctx.Deadline(); ok && dl.Equal(d) {
		return ctx, func() {}
	}
	return context.WithDeadline(ctx, d)
}

// abort ends the request's context, if it started (Server.Close).
func (w *watch) abort() {
	w.mu.Lock()
	cancel := w.cancel
	w.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// start starts watching the client, once per request, while the handler
// runs, with the request's context ending at deadline (zero: none); a
// late call (a context kept past its request) gets the server's, and a
// later one the started context.
func (w *watch) start(deadline time.Time) context.Context {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.ctx != nil:
		return w.ctx
	case !w.active:
		return w.c.s.ctx
	}
	if deadline.IsZero() {
		w.ctx, w.cancel = context.WithCancel(context.Background())
	} else {
		w.ctx, w.cancel = context.WithDeadline(context.Background(), deadline)
	}
	if w.c.s.ctx.Err() != nil { // Close ended the others before this started
		w.cancel()
	}
	if w.c.flush() != nil {
		w.gone = true
		w.cancel()
		return w.ctx
	}
	if !w.more {
		gen := w.gen
		w.timer = time.AfterFunc(watchDelay, func() { w.late(gen) })
	}
	return w.ctx
}

// watchDelay is how long a lookup waits before its client is watched. A
// cold lookup is answered within a few tens of milliseconds up to the
// quota and within about 150 ms at it; watching costs a goroutine and
// three syscalls, a tenth of such a lookup's CPU, for a departure that a
// client's own timeout (a second or more) would tell no sooner.
var watchDelay = 250 * time.Millisecond // a variable for tests only

// late starts the background read of request gen, unless its handler
// has returned (a timer that fired as it was stopped may get here after
// the next request began: gen tells them apart).
func (w *watch) late(gen uint64) {
	w.mu.Lock()
	if w.stop || w.gen != gen {
		w.mu.Unlock()
		return
	}
	// The read waits as long as the handler: not until the deadline the
	// read that got the request left (the idle or head timeout's), which
	// would end a lookup whose client is still there. finish sets its
	// own (after this: it takes the lock first), and the next read its own.
	w.c.nc.SetReadDeadline(time.Time{})
	done := make(chan struct{})
	w.done = done
	w.mu.Unlock()
	w.read(done)
}

// read waits for the client to send more or go away.
func (w *watch) read(done chan struct{}) {
	defer close(done)
	n, _ := w.c.nc.Read(w.b[:])
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case n > 0:
		w.peeked = true
	case !w.stop:
		w.gone = true
		w.cancel()
	}
}

// finish ends the request's watch once the handler has returned, and
// returns the byte the read got, if any, and whether the client is gone.
func (w *watch) finish() (b byte, peeked, gone bool) {
	w.mu.Lock()
	w.active, w.stop = false, true
	timer := w.timer
	w.mu.Unlock()
	if timer != nil {
		timer.Stop() // or late, already running, sees stop or has set done
	}
	w.mu.Lock()
	done, cancel := w.done, w.cancel
	w.mu.Unlock()
	if done != nil {
		w.c.nc.SetReadDeadline(aLongTimeAgo)
		<-done
		w.c.rdl = aLongTimeAgo // the next read sets its own
	}
	if cancel != nil {
		cancel()
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	b, peeked, gone = w.b[0], w.peeked, w.gone
	w.ctx, w.cancel, w.done, w.timer, w.stop, w.peeked, w.gone = nil, nil, nil, nil, false, false, false
	w.gen++
	return b, peeked, gone
}
