package main

import (
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// countingServer serves the bare handler on loopback and counts the
// connections clients open to it.
func countingServer(t *testing.T, h http.Handler) (url string, conns *atomic.Int64) {
	t.Helper()
	conns = new(atomic.Int64)
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL + im.PathGet + "?sdkappid=1&identifier=a&usersig=x&random=1&contenttype=json", conns
}

// TestOpenLoopWarmPool: with open connections the run dials them before
// its clock starts and never more, every lookup is answered (waiting for a
// free worker when all are busy, not dropped), and the generator's
// lateness and CPU are measured.
func TestOpenLoopWarmPool(t *testing.T) {
	var inFlight, most atomic.Int64
	slow := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
		}
		time.Sleep(2 * time.Millisecond) // 4 workers at 2 ms: at most 2,000/s, under the 4,000/s offered
		bareHandler().ServeHTTP(w, r)
	})
	url, conns := countingServer(t, slow)
	s := openLoop([]string{url}, 4000, 500*time.Millisecond, maxConns, 4, func(i int64) string { return imsim.AccountName(int(i % 50)) })
	if s.sent != 2000 || s.ok != 2000 || s.errors+s.wrong+s.shed+s.unsent != 0 {
		t.Fatalf("sent %d ok %d errors %d wrong %d shed %d unsent %d (first error %q)", s.sent, s.ok, s.errors, s.wrong, s.shed, s.unsent, s.firstErr)
	}
	if c := conns.Load(); c != 4 {
		t.Errorf("%d connections opened, want the 4 of the warm pool", c)
	}
	if m := most.Load(); m > 4 {
		t.Errorf("%d lookups in flight at once over 4 connections", m)
	}
	// Twice the offered rate of what the server answers: the backlog waits
	// for workers, and the lookups due last wait about half the run.
	if p := pct(s.lat, 1); p < 200*time.Millisecond {
		t.Errorf("max latency %v: a backlog of ~1,000 lookups must show in the latency from when they were due", p)
	}
	if len(s.lags) != len(s.lat) || s.genCPU <= 0 || s.slowHandled != -1 {
		t.Errorf("%d lags for %d latencies, generator CPU %v, slowHandled %v", len(s.lags), len(s.lat), s.genCPU, s.slowHandled)
	}
}

// TestOpenLoopDials: with no warm pool, lookups dial as they go, up to
// maxConns, and a lookup finding every connection busy is counted unsent.
func TestOpenLoopDials(t *testing.T) {
	release := make(chan struct{})
	blocked := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		bareHandler().ServeHTTP(w, r)
	})
	url, conns := countingServer(t, blocked)
	// Released well after the 200 ms window, so that no connection is
	// free again while lookups are still being dispatched, even on a
	// loaded machine under -race.
	time.AfterFunc(2*time.Second, func() { close(release) })
	s := openLoop([]string{url}, 1000, 200*time.Millisecond, 5, 0, func(i int64) string { return imsim.AccountName(int(i)) })
	if s.sent != 5 || s.ok != 5 || s.unsent != 195 {
		t.Fatalf("sent %d ok %d unsent %d; want 5, 5, 195 (first error %q)", s.sent, s.ok, s.unsent, s.firstErr)
	}
	if c := conns.Load(); c != 5 {
		t.Errorf("%d connections opened, want 5", c)
	}
}
