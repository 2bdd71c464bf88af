package front

import (
	"net"
	"net/http"
	"testing"
	"time"
)

// The background read a watched request starts must not inherit the read
// deadline left on the connection by the read that got the request (the
// idle deadline, or the head's ReadHeaderTimeout): net/http's background
// read has no deadline but ReadTimeout's, so a client still connected
// keeps its lookup past IdleTimeout. Here, with IdleTimeout 200 ms, a
// lookup waiting 1 s was cancelled as if its client had left, at the
// idle deadline (in production: a head split across reads and
// ReadHeaderTimeout 5 s cut lookups the 5 s request timeout allowed).
func TestWatchedLookupOutlivesIdleDeadline(t *testing.T) {
	w := &ctxWatch{held: make(chan struct{}, 1), release: make(chan struct{}), ended: make(chan struct{})}
	_, addr := serveFront(t, Config{Path: testPath, Handler: w, Fallback: &http.Server{IdleTimeout: 200 * time.Millisecond, ReadHeaderTimeout: 200 * time.Millisecond}})
	for _, split := range []bool{false, true} {
		w.ended = make(chan struct{})
		w.release = make(chan struct{})
		c := dial(t, addr)
		req := lookup("a=1", "x")
		if split {
			c.send(req[:10])
			time.Sleep(50 * time.Millisecond) // let the front read the first part alone
			c.send(req[10:])
		} else {
			c.send(req)
		}
		<-w.held
		select {
		case <-w.ended:
			t.Fatalf("split=%v: a lookup whose client is still there was cancelled at the connection's read deadline", split)
		case <-time.After(time.Second):
		}
		close(w.release)
		if _, body := c.answer(); body != "x" {
			t.Fatalf("%q", body)
		}
		c.c.Close()
	}
}

// A client that half-closes (CloseWrite) after its request still reads
// its answer, as from net/http (whose background read also ends the
// request's context at that EOF): the lookup's context ends, the answer
// is written with Connection: close.
func TestHalfClosedClientGetsItsAnswer(t *testing.T) {
	w := &ctxWatch{held: make(chan struct{}, 1), release: make(chan struct{}), ended: make(chan struct{})}
	_, addr := serveFront(t, Config{Path: testPath, Handler: w, Fallback: &http.Server{}})
	defer func() {
		close(w.release)
	}()
	c := dial(t, addr)
	c.send(lookup("a=1", "x"))
	<-w.held
	if err := c.c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	<-w.ended
	resp, body := c.answer()
	if body != "x" || !resp.Close {
		t.Fatalf("%q close=%v", body, resp.Close)
	}
}
