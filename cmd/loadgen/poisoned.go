package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// poisonedResult is one run of the poisoned scenario.
type poisonedResult struct {
	poisoned             bool
	callers              int
	rate                 float64 // good lookups answered per second
	goodErrors, wrong    int64   // good callers' failed and wrong answers
	calls, refused       int64   // upstream calls, and those refused (40009)
	isolation            float64 // calls spent isolating refusals (isolation_calls_total)
	offenderRequests     int64   // the poisoned caller's requests
	offenderRight        int64   // … answered 40009 naming its own tag
	offenderLocal        float64 // … answered without a call (refused_tag_requests_total)
	callsPerSec, elapsed float64
}

// poisoned is cold load from o.callers good callers (200 by default for
// this scenario), each looking up one new account at a time, with and
// without one more caller who asks, in a loop, for an account and a custom
// tag the app never configured — a new such tag every time, so every one
// is refused by the upstream and must be isolated (the worst case: a
// repeated tag is learned and costs nothing after its first refusal). It
// reports the good callers' failures (must be 0), the calls isolation
// spent, and lookups/s next to the same run without the poisoned caller.
func poisoned(o options, out io.Writer) error {
	callers := o.callers
	if callers == 1000 { // the default of -callers, meant for the other scenarios
		callers = 200
	}
	fmt.Fprintf(out, "poisoned: %d cold callers, with and without one caller asking for a custom tag the app never configured (a new one each time), %v each\n",
		callers, o.duration)
	for _, poison := range []bool{false, true} {
		r, err := poisonedRun(o, callers, poison)
		if err != nil {
			return err
		}
		rep.poisoned = append(rep.poisoned, r)
		label := "without the poisoned caller"
		if poison {
			label = "with the poisoned caller   "
		}
		fmt.Fprintf(out, "  %s: %7.0f lookups/s, good-caller errors %d, wrong %d; upstream calls %d (%.1f/s), refused %d, isolation calls %.0f\n",
			label, r.rate, r.goodErrors, r.wrong, r.calls, r.callsPerSec, r.refused, r.isolation)
		if poison {
			fmt.Fprintf(out, "  poisoned caller: %d requests, %d answered 40009 naming its own tag; %.2f isolation calls per refused tag\n",
				r.offenderRequests, r.offenderRight, r.isolation/float64(max(1, r.offenderRequests)))
		}
	}
	fmt.Fprintln(out)
	return nil
}

// poisonName returns the i-th custom tag name made of letters only.
func poisonName(i int64) string {
	const letters = "abcdefghijklmnopqrstuvwxyz"
	b := []byte("Tag_Profile_Custom_Z")
	for i++; i > 0 && len(b) < len("Tag_Profile_Custom_")+8; i /= 26 {
		b = append(b, letters[i%26])
	}
	return string(b)
}

func poisonedRun(o options, callers int, poison bool) (poisonedResult, error) {
	e, err := startEnv(o)
	if err != nil {
		return poisonedResult{}, err
	}
	defer e.stop()
	var next atomic.Int64
	next.Store(300_000)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second+o.duration)
	defer cancel()
	var answered atomic.Int64
	loop := startColdLoop(ctx, e.urls, callers, &next, func(int, time.Time, time.Duration) { answered.Add(1) })
	var reqs, right atomic.Int64
	var measuring atomic.Bool
	offDone := make(chan struct{})
	go func() {
		defer close(offDone)
		if !poison {
			return
		}
		c, err := newRawConn(e.url)
		if err != nil {
			return
		}
		defer c.close()
		for i := int64(0); ctx.Err() == nil; i++ {
			tag := poisonName(i)
			got, err := c.post(`{"To_Account":["user7"],"TagList":["Tag_Profile_IM_Nick","` + tag + `"]}`)
			if err != nil || !measuring.Load() {
				continue
			}
			reqs.Add(1)
			var r im.GetResponse
			if json.Unmarshal(got, &r) == nil && r.ErrorCode == im.CodeTagNotExist && containsTag(r.ErrorInfo, tag) {
				right.Add(1)
			}
		}
	}()
	time.Sleep(time.Second)
	if err := simReset(e.simURL); err != nil {
		return poisonedResult{}, err
	}
	before, err := scrape(e.admin)
	if err != nil {
		return poisonedResult{}, err
	}
	answered.Store(0)
	loop.measuring.Store(true)
	measuring.Store(true)
	start := time.Now()
	<-ctx.Done()
	elapsed := time.Since(start)
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return poisonedResult{}, err
	}
	after, err := scrape(e.admin)
	if err != nil {
		return poisonedResult{}, err
	}
	loop.wg.Wait()
	<-offDone
	sum := func(m map[string]float64, prefix string) float64 {
		var s float64
		for k, v := range m {
			if len(k) >= len(prefix) && k[:len(prefix)] == prefix {
				s += v
			}
		}
		return s
	}
	iso := "portrait_proxy_isolation_calls_total"
	return poisonedResult{poisoned: poison, callers: callers, rate: float64(answered.Load()) / elapsed.Seconds(),
		goodErrors: loop.errs.Load(), wrong: loop.wrong.Load(), calls: st.Calls, refused: st.Rejected,
		isolation: sum(after, iso) - sum(before, iso), offenderRequests: reqs.Load(), offenderRight: right.Load(),
		offenderLocal: sum(after, "portrait_proxy_refused_tag_requests_total") - sum(before, "portrait_proxy_refused_tag_requests_total"),
		callsPerSec:   float64(st.Calls) / elapsed.Seconds(), elapsed: elapsed.Seconds()}, nil
}

func containsTag(info, tag string) bool {
	for i := 0; i+len(tag) <= len(info); i++ {
		if info[i:i+len(tag)] == tag && (i+len(tag) == len(info) || !isLetter(info[i+len(tag)])) {
			return true
		}
	}
	return false
}

func isLetter(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }

// writePoisoned is the poisoned scenario's section of the report.
func (r *report) writePoisoned(p func(string, ...any)) {
	if len(r.poisoned) == 0 {
		return
	}
	p("## One poisoned caller among cold callers\n\n")
	p("%d callers each look up one new account at a time (cold), through one proxy; in the second run one more caller asks, in a\n", r.poisoned[0].callers)
	p("loop, for an account and a custom tag the app never configured — a new one each time, so the upstream refuses every\n")
	p("one and each must be isolated (a repeated tag is learned after its first refusal and costs nothing). The upstream\n")
	p("refuses a call carrying such a tag whole (40009): without isolation, every caller sharing it would fail.\n\n")
	p("| run | good lookups/s | good-caller errors | wrong | upstream calls/s | refused calls | isolation calls | offender requests (answered 40009 with its tag) |\n")
	p("|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.poisoned {
		name := "without the poisoned caller"
		off := "—"
		if x.poisoned {
			name = "with the poisoned caller"
			off = fmt.Sprintf("%d (%d)", x.offenderRequests, x.offenderRight)
		}
		p("| %s | %s | %d | %d | %.1f | %d | %.0f | %s |\n", name, thousands(x.rate), x.goodErrors, x.wrong, x.callsPerSec, x.refused, x.isolation, off)
	}
	if len(r.poisoned) == 2 && r.poisoned[1].offenderRequests > 0 {
		x := r.poisoned[1]
		p("\nIsolation cost %.2f calls per refused tag (bound: 2·⌈log₂ tag sets⌉ + 2 per refused call), %.1f %% of the calls;\n",
			x.isolation/float64(x.offenderRequests), 100*x.isolation/float64(max(1, x.calls)))
		p("good lookups/s with the poisoned caller are %.1f %% of those without.\n\n", 100*x.rate/max(1, r.poisoned[0].rate))
	}
}
