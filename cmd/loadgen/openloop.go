package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// step is what one constant-rate run measured.
type step struct {
	offered  float64         // lookups/s asked for
	sent     int64           // lookups sent (offered × duration, unless the generator ran out of connections)
	ok       int64           // answered right
	shed     int64           // answered 60007 (the proxy refused what the quota cannot serve in time)
	errors   int64           // any other failure
	wrong    int64           // answered, but not with the upstream's value
	unsent   int64           // not sent: every connection busy (the generator, not the proxy, was the limit)
	elapsed  time.Duration   // until the last answer
	window   time.Duration   // the offered window
	lat      []time.Duration // of right answers, from their scheduled send time, sorted
	lags     []time.Duration // of right answers, from their scheduled send time to when the generator dispatched them (its own lateness), sorted
	firstErr string
	steady   int64 // right answers completed in the steady window [window/4, window]

	// filled by the scenario
	accountsPerCall float64
	maxCallsPerSec  int
	throttled       int64
	cpu             float64 // cores used by the proxies
	genCPU          float64 // cores used by the load generator (this process)
	slowHandled     float64 // share of the proxy's requests whose handler took over 0.5 ms (-1: not known)
	rssMiB          int64
}

// rate is the answered rate: right answers per second of the offered
// window, but no more than the rate at which right answers completed in
// the window's last three quarters. Below saturation the two agree (every
// offered lookup answered); above it the second is the server's capacity,
// and answers still queued when the window ends do not count as served in
// it.
func (s *step) rate() float64 {
	return min(float64(s.ok)/s.window.Seconds(), float64(s.steady)/(0.75*s.window.Seconds()))
}

// openQueue is how many lookups may wait for a warm pool's workers before
// the dispatcher waits too.
const openQueue = 1 << 14

// openLoop offers rate lookups per second for d across urls: lookup i is
// due at start + i/rate and is sent then whatever happened to earlier ones,
// and its latency runs from when it was due, not from when it went out, so
// a stall shows in every lookup it delays (no coordinated omission). pick
// names lookup i's account.
//
// With open 0, each lookup takes a free keep-alive connection or dials one,
// up to maxConns; a lookup finding none is counted unsent. With open > 0,
// open connections (spread over urls) are dialled before the clock starts
// and are all there is, as an app server's warm, bounded keep-alive pool:
// each has a worker, and a lookup finding every worker busy waits for the
// first one free (first come, first served), the wait in its latency.
// Dialling during the run would measure the generator's own dials, and
// after a stall the generator would dial thousands of connections, whose
// cost to both sides of the loopback makes the stall last; a goroutine per
// lookup would cost the generator's core more than the lookup's own I/O.
func openLoop(urls []string, rate float64, d time.Duration, maxConns, open int, pick func(i int64) string) *step {
	// The generator's collections stall its dispatching: fewer of them.
	defer debug.SetGCPercent(debug.SetGCPercent(800))
	var warm [][]*rawConn
	if open > 0 {
		warm = make([][]*rawConn, len(urls))
		for i := range min(open, maxConns) {
			if c, err := newRawConn(urls[i%len(urls)]); err == nil && c.dial() == nil {
				warm[i%len(urls)] = append(warm[i%len(urls)], c)
			}
		}
		for u, w := range warm {
			if len(w) == 0 { // a url none could be dialled to: dial as lookups go
				for _, w := range warm {
					for _, c := range w {
						c.close()
					}
				}
				warm = nil
				fmt.Fprintf(os.Stderr, "open loop: no connection to %s could be dialled before the run: every lookup dials as it goes\n", urls[u])
				break
			}
		}
	}
	// The clock starts once the warm pool is open.
	cpu0 := selfCPU()
	r := &openRun{start: time.Now(), d: d, lat: make([]time.Duration, 0, int(rate*d.Seconds())+1)}
	// A server that stops answering must not keep a warm pool's workers at
	// it, each lookup for the client's timeout: lookups not sent by the
	// window's end plus this are counted unsent.
	r.cutoff = r.start.Add(d + 10*time.Second)
	total := int64(rate * d.Seconds())
	interval := time.Duration(float64(time.Second) / rate)
	var send func(i int64, at time.Time)
	var wg sync.WaitGroup
	var finish func()
	if warm != nil {
		type job struct {
			at, sent time.Time
			account  string
		}
		queues := make([]chan job, len(urls))
		for u, w := range warm {
			// Lookups waiting for a worker; when they are more, the
			// dispatcher waits too (and its lateness is in theirs).
			queues[u] = make(chan job, min(total+1, openQueue))
			for _, c := range w {
				wg.Go(func() {
					defer c.close()
					for j := range queues[u] {
						r.record(c, j.account, j.at, j.sent)
					}
				})
			}
		}
		send = func(i int64, at time.Time) { queues[i%int64(len(urls))] <- job{at, time.Now(), pick(i)} }
		finish = func() {
			for _, q := range queues {
				close(q)
			}
			wg.Wait()
		}
	} else {
		pools := make([]chan *rawConn, len(urls))
		for i := range pools {
			pools[i] = make(chan *rawConn, maxConns)
		}
		var conns atomic.Int64
		send = func(i int64, at time.Time) {
			pool := pools[i%int64(len(pools))]
			var c *rawConn
			select {
			case c = <-pool:
			default:
				if conns.Add(1) > int64(maxConns) {
					conns.Add(-1)
					r.unsent.Add(1)
					return
				}
				var err error
				if c, err = newRawConn(urls[i%int64(len(urls))]); err != nil {
					conns.Add(-1)
					r.errs.Add(1)
					return
				}
			}
			account := pick(i)
			sent := time.Now()
			wg.Go(func() {
				r.record(c, account, at, sent)
				pool <- c
			})
		}
		finish = func() {
			wg.Wait()
			for _, p := range pools {
				close(p)
				for c := range p {
					c.close()
				}
			}
		}
	}
	for i := int64(0); i < total; {
		now := time.Now()
		due := min(total, int64(now.Sub(r.start)/interval)+1)
		for ; i < due; i++ {
			send(i, r.start.Add(time.Duration(i)*interval))
		}
		if next := r.start.Add(time.Duration(i) * interval); time.Until(next) > 0 {
			time.Sleep(time.Until(next))
		}
	}
	finish()
	gen := selfCPU() - cpu0
	slices.Sort(r.lat)
	slices.Sort(r.lags)
	st := &step{offered: rate, sent: total - r.unsent.Load(), ok: r.ok.Load(), shed: r.shed.Load(), errors: r.errs.Load(), wrong: r.wrong.Load(),
		unsent: r.unsent.Load(), lat: r.lat, lags: r.lags, steady: r.steady.Load(), window: d,
		// answers still arriving after the window belong to it: the rate
		// is over the time until the last answer
		elapsed: max(d, time.Duration(r.lastDone.Load()))}
	if v := r.firstErr.Load(); v != nil {
		st.firstErr = v.(string)
	}
	st.genCPU, st.slowHandled = gen.Seconds()/st.elapsed.Seconds(), -1
	return st
}

// openRun is what an openLoop run counts.
type openRun struct {
	start, cutoff                 time.Time
	d                             time.Duration
	ok, shed, errs, wrong, unsent atomic.Int64
	lastDone, steady              atomic.Int64
	firstErr                      atomic.Value
	mu                            sync.Mutex
	lat                           []time.Duration
	lags                          []time.Duration // of right answers: from when each was due to when the generator dispatched it
}

// record makes the lookup of account due at at, dispatched at sent, on c
// and counts its outcome.
func (r *openRun) record(c *rawConn, account string, at, sent time.Time) {
	if !r.cutoff.IsZero() && time.Now().After(r.cutoff) {
		r.unsent.Add(1)
		return
	}
	lag := sent.Sub(at)
	good, bad, err := lookup(c, account)
	took := time.Since(at)
	for end := int64(time.Since(r.start)); ; {
		if old := r.lastDone.Load(); old >= end || r.lastDone.CompareAndSwap(old, end) {
			break
		}
	}
	switch {
	case err != nil && strings.Contains(err.Error(), "code 60007"):
		r.shed.Add(1)
	case err != nil:
		r.errs.Add(1)
		r.firstErr.CompareAndSwap(nil, err.Error())
	case bad:
		r.wrong.Add(1)
	case good:
		r.ok.Add(1)
		if end := time.Since(r.start); end >= r.d/4 && end <= r.d {
			r.steady.Add(1)
		}
		r.mu.Lock()
		r.lat = append(r.lat, took)
		r.lags = append(r.lags, lag)
		r.mu.Unlock()
	}
}
