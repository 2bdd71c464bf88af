package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"time"
)

// outageResult is the Redis-outage scenario: three replicas under cold
// load, Redis killed and restarted (empty) on the same address.
type outageResult struct {
	before, during, after float64 // lookups/s in each phase
	maxCalls              int
	throttled             int64
	errors, wrong         int64
	perSecond             []int64 // lookups answered in each second of the run
	killAt, reviveAt      int     // seconds into the run
}

// outage drives cold load through three replicas on one Redis, kills Redis
// at killAt and starts it again at reviveAt: the shared quota falls back to
// each replica's -rate-fallback-share (0.3 by default: 90 % of the quota
// for three) and comes back; the quota must hold and nothing may fail.
func outage(o options, out io.Writer) error {
	const total, killAt, reviveAt = 14, 4, 9 // seconds
	e, err := startReplicas(o, 3)
	if err != nil {
		return err
	}
	defer e.stop()
	_, portStr, _ := net.SplitHostPort(e.redisAddr)
	port, _ := strconv.Atoi(portStr)
	var next atomic.Int64 // every account is new: each scenario has its own emulator and Redis
	perSecond := make([]atomic.Int64, total)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second+total*time.Second)
	defer cancel()
	var start time.Time // set before measuring starts
	loop := startColdLoop(ctx, e.urls, o.callers, &next, func(_ int, end time.Time, _ time.Duration) {
		if sec := int(end.Sub(start) / time.Second); sec < total {
			perSecond[sec].Add(1)
		}
	})
	time.Sleep(time.Second)
	if err := simReset(e.simURL); err != nil {
		return err
	}
	start = time.Now()
	loop.measuring.Store(true)
	time.Sleep(killAt * time.Second)
	e.redis.Process.Kill()
	e.redis.Wait()
	time.Sleep((reviveAt - killAt) * time.Second)
	rcmd, _, err := startRedisOn(port)
	if err != nil {
		return fmt.Errorf("restarting redis: %w", err)
	}
	e.redis = rcmd
	<-ctx.Done()
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return err
	}
	loop.wg.Wait()
	r := outageResult{maxCalls: st.MaxCallsPerSec, throttled: st.Throttled, errors: loop.errs.Load(), wrong: loop.wrong.Load(),
		killAt: killAt, reviveAt: reviveAt}
	for i := range perSecond {
		r.perSecond = append(r.perSecond, perSecond[i].Load())
	}
	mean := func(from, to int) float64 {
		var n int64
		for _, v := range r.perSecond[from:to] {
			n += v
		}
		return float64(n) / float64(to-from)
	}
	// The second after each switch is left out of the phase means.
	r.before, r.during, r.after = mean(1, killAt), mean(killAt+1, reviveAt), mean(reviveAt+2, total)
	rep.outage = &r
	fmt.Fprintf(out, "Redis outage: 3 replicas, %d callers, cold; Redis killed at %ds, started again (empty) at %ds\n", o.callers, killAt, reviveAt)
	fmt.Fprintf(out, "  lookups/s before %.0f, during %.0f, after %.0f\n", r.before, r.during, r.after)
	fmt.Fprintf(out, "  per second: %v\n", r.perSecond)
	fmt.Fprintf(out, "  max calls in any sliding second %d, throttled %d, errors %d, wrong %d\n", r.maxCalls, r.throttled, r.errors, r.wrong)
	if v := loop.firstErr.Load(); v != nil {
		fmt.Fprintf(out, "  first error: %s\n", v)
	}
	fmt.Fprintln(out)
	return nil
}
