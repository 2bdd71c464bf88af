package front

import (
	"context"
	"errors"
	"io"
	"net/http"
	"testing"
	"time"
)

// ctxHandler runs each request's body-named scenario on its context and
// reports what the context said.
type ctxHandler struct {
	held    chan struct{}
	release chan struct{}
	errs    chan error
	kept    chan context.Context // contexts derived during a request, kept past it
	cancels chan context.CancelFunc
}

type withDeadliner interface {
	WithDeadline(time.Time) (context.Context, context.CancelFunc)
}

func (h *ctxHandler) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	switch string(body) {
	case "deadline": // as the HTTP handler asks when a lookup may wait
		d := time.Now().Add(50 * time.Millisecond)
		wctx, cancel := ctx.(withDeadliner).WithDeadline(d)
		defer cancel()
		if got, ok := wctx.Deadline(); !ok || !got.Equal(d) {
			h.errs <- errors.New("the request's context does not have the deadline asked")
			break
		}
		derived, stop := context.WithCancel(wctx)
		defer stop()
		<-derived.Done()
		h.errs <- wctx.Err()
	case "wait-deadline", "wait-done":
		wctx := ctx
		if string(body) == "wait-deadline" {
			var cancel context.CancelFunc
			wctx, cancel = ctx.(withDeadliner).WithDeadline(time.Now().Add(time.Minute))
			defer cancel()
		}
		h.held <- struct{}{}
		select {
		case <-wctx.Done():
			h.errs <- wctx.Err()
		case <-h.release: // the test is over
		}
	case "derive":
		d, cancel := context.WithCancel(ctx) // kept past the request on purpose
		h.kept <- d
		h.cancels <- cancel
	}
	return append(out, "x"...)
}

// TestRequestContextDeadline: the context the handler gets with
// WithDeadline is the request's own with that deadline, ends with
// DeadlineExceeded when it passes, and so do contexts derived from it.
func TestRequestContextDeadline(t *testing.T) {
	h := &ctxHandler{held: make(chan struct{}, 2), errs: make(chan error, 2), kept: make(chan context.Context, 1), cancels: make(chan context.CancelFunc, 1)}
	_, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	c := dial(t, addr)
	c.send(lookup("a=1", "deadline"))
	if err := recv(t, h.errs); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the request's context ended with %v, want the deadline", err)
	}
	if _, body := c.answer(); body != "x" {
		t.Fatalf("answer %q", body)
	}
}

// TestCloseEndsWaitingContexts: Server.Close ends the context of every
// request waiting on it, started with a deadline or by Done, though none
// derives from the server's own context.
func TestCloseEndsWaitingContexts(t *testing.T) {
	// No client is watched meanwhile, so only Close can end them (a
	// closed connection would otherwise end them too, after watchDelay).
	defer func(d time.Duration) { watchDelay = d }(watchDelay)
	watchDelay = time.Hour
	h := &ctxHandler{held: make(chan struct{}, 2), errs: make(chan error, 2), kept: make(chan context.Context, 1), cancels: make(chan context.CancelFunc, 1)}
	h.release = make(chan struct{})
	s, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	t.Cleanup(func() { close(h.release) }) // before the server's Close (cleanups run last first)
	for _, body := range []string{"wait-deadline", "wait-done"} {
		dial(t, addr).send(lookup("a=1", body))
		<-h.held
	}
	go s.Close() // which waits for the handlers
	for range 2 {
		select {
		case err := <-h.errs:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("a waiting request's context ended with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close left a request waiting on its context")
		}
	}
}

// TestContextDerivedFromRequestEndsWithIt: a context the handler derives
// from the request's (with no deadline of the front's) ends when the
// request does, even when kept past it.
func TestContextDerivedFromRequestEndsWithIt(t *testing.T) {
	h := &ctxHandler{held: make(chan struct{}, 2), errs: make(chan error, 2), kept: make(chan context.Context, 1), cancels: make(chan context.CancelFunc, 1)}
	_, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	c := dial(t, addr)
	c.send(lookup("a=1", "derive"))
	c.answer()
	d := <-h.kept
	defer (<-h.cancels)()
	select {
	case <-d.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a context derived from a request's outlives it")
	}
	// The connection serves the next request with a context of its own.
	c.send(lookup("a=2", "deadline"))
	if err := recv(t, h.errs); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("next request's context ended with %v", err)
	}
	c.answer()
}

// recv is the next error the handler reports, or a failure after 10 s.
func recv(t *testing.T, errs chan error) error {
	t.Helper()
	select {
	case err := <-errs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the handler reported nothing")
		return nil
	}
}

// lateStarter holds a request until released, then starts its context
// (asks for Done) and reports how it ended.
type lateStarter struct {
	held, release chan struct{}
	errs          chan error
}

func (h *lateStarter) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	h.held <- struct{}{}
	<-h.release
	select {
	case <-ctx.Done():
		h.errs <- ctx.Err()
	case <-time.After(10 * time.Second):
		h.errs <- errors.New("a context started after Close never ended")
	}
	return append(out, "x"...)
}

// TestContextStartedAfterCloseEnds: a request whose handler starts its
// context only after Close has ended the others finds it ended.
func TestContextStartedAfterCloseEnds(t *testing.T) {
	defer func(d time.Duration) { watchDelay = d }(watchDelay)
	watchDelay = time.Hour // only Close can end it
	h := &lateStarter{held: make(chan struct{}, 1), release: make(chan struct{}), errs: make(chan error, 1)}
	s, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	dial(t, addr).send(lookup("a=1", "x"))
	<-h.held
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	for s.ctx.Err() == nil { // Close has cancelled the server's context and goes on to the requests'
		time.Sleep(time.Millisecond)
	}
	close(h.release)
	if err := recv(t, h.errs); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	<-closed
}

// holdUntilDone is a handler that starts its context with a deadline an
// hour away and waits for it to end.
type holdUntilDone struct{ started chan struct{} }

func (h *holdUntilDone) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	wctx, cancel := ctx.(withDeadliner).WithDeadline(time.Now().Add(time.Hour))
	defer cancel()
	select {
	case h.started <- struct{}{}:
	default:
	}
	<-wctx.Done()
	return append(out, "x"...)
}

// TestCloseRacingRequestsStarting: Close while requests are starting
// their contexts ends every one of them (Close returns only once every
// handler has).
func TestCloseRacingRequestsStarting(t *testing.T) {
	defer func(d time.Duration) { watchDelay = d }(watchDelay)
	watchDelay = time.Hour
	for i := range 30 {
		h := &holdUntilDone{started: make(chan struct{}, 1)}
		s, addr := serveFront(t, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
		for range 8 {
			go io.WriteString(dial(t, addr).c, lookup("a=1", "x"))
		}
		if i%2 == 0 {
			<-h.started
		}
		done := make(chan struct{})
		go func() { s.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Fatal("Close left a handler waiting on its context")
		}
	}
}
