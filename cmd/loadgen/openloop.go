package main

import (
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
	firstErr string
	steady   int64 // right answers completed in the steady window [window/4, window]

	// filled by the scenario
	accountsPerCall float64
	maxCallsPerSec  int
	throttled       int64
	cpu             float64 // cores used by the proxies
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

// openLoop offers rate lookups per second for d across urls: lookup i is
// due at start + i/rate and is sent then whatever happened to earlier ones,
// and its latency runs from when it was due, not from when it went out, so
// a stall shows in every lookup it delays (no coordinated omission). Each
// lookup takes a free keep-alive connection or opens one, up to maxConns;
// a lookup finding none is counted unsent. pick names lookup i's account.
// open connections (spread over urls) are opened before the clock starts,
// as an app server's warm keep-alive pool: otherwise the first lookups
// wait for the generator's own dials, and a server's steady latency is
// measured with the generator's ramp in it.
func openLoop(urls []string, rate float64, d time.Duration, maxConns, open int, pick func(i int64) string) *step {
	pools := make([]chan *rawConn, len(urls))
	for i := range pools {
		pools[i] = make(chan *rawConn, maxConns)
	}
	var conns, lastDone, steady atomic.Int64
	for i := range min(open, maxConns) {
		if c, err := newRawConn(urls[i%len(urls)]); err == nil {
			pools[i%len(urls)] <- c
			conns.Add(1)
		}
	}
	var ok, shed, errs, wrong, unsent atomic.Int64
	var firstErr atomic.Value
	var mu sync.Mutex
	lat := make([]time.Duration, 0, int(rate*d.Seconds())+1)
	var wg sync.WaitGroup
	start := time.Now()
	interval := time.Duration(float64(time.Second) / rate)
	total := int64(rate * d.Seconds())
	for i := int64(0); i < total; {
		now := time.Now()
		due := min(total, int64(now.Sub(start)/interval)+1)
		for ; i < due; i++ {
			at := start.Add(time.Duration(i) * interval)
			pool := pools[i%int64(len(pools))]
			var c *rawConn
			select {
			case c = <-pool:
			default:
				if conns.Add(1) > int64(maxConns) {
					conns.Add(-1)
					unsent.Add(1)
					continue
				}
				var err error
				if c, err = newRawConn(urls[i%int64(len(urls))]); err != nil {
					conns.Add(-1)
					errs.Add(1)
					continue
				}
			}
			account := pick(i)
			wg.Add(1)
			go func() {
				defer wg.Done()
				good, bad, err := lookup(c, account)
				took := time.Since(at)
				pool <- c
				for end := int64(time.Since(start)); ; {
					if old := lastDone.Load(); old >= end || lastDone.CompareAndSwap(old, end) {
						break
					}
				}
				switch {
				case err != nil && strings.Contains(err.Error(), "code 60007"):
					shed.Add(1)
				case err != nil:
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				case bad:
					wrong.Add(1)
				case good:
					ok.Add(1)
					if end := time.Since(start); end >= d/4 && end <= d {
						steady.Add(1)
					}
					mu.Lock()
					lat = append(lat, took)
					mu.Unlock()
				}
			}()
		}
		if next := start.Add(time.Duration(i) * interval); time.Until(next) > 0 {
			time.Sleep(time.Until(next))
		}
	}
	wg.Wait()
	for _, p := range pools {
		close(p)
		for c := range p {
			c.close()
		}
	}
	slices.Sort(lat)
	s := &step{offered: rate, sent: total - unsent.Load(), ok: ok.Load(), shed: shed.Load(), errors: errs.Load(), wrong: wrong.Load(),
		unsent: unsent.Load(), lat: lat, steady: steady.Load(), window: d,
		// answers still arriving after the window belong to it: the rate
		// is over the time until the last answer
		elapsed: max(d, time.Duration(lastDone.Load()))}
	if v := firstErr.Load(); v != nil {
		s.firstErr = v.(string)
	}
	return s
}
