package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// mixTags are the tags the tag-mix callers pick subsets of: all standard,
// set for every emulated account.
var mixTags = []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Image", "Tag_Profile_IM_AllowType"}

// checkAnswer reports whether got is exactly the upstream's answer for
// accounts and tags: every account, in order, with its seeded value of
// every tag, in the order asked, and nothing else. per says, per account,
// whether it was answered (a failed account: its ResultCode or the
// request's ErrorCode is not 0) and wrong whether anything answered was
// not the upstream's value.
func checkAnswer(got []byte, accounts, tags []string) (per []bool, code int, wrong bool, err error) {
	var r im.GetResponse
	if err := json.Unmarshal(got, &r); err != nil {
		return nil, 0, false, err
	}
	per = make([]bool, len(accounts))
	if r.ErrorCode != 0 && len(r.UserProfileItem) == 0 {
		return per, r.ErrorCode, false, nil
	}
	if len(r.UserProfileItem) != len(accounts) {
		return per, r.ErrorCode, true, nil
	}
	for i, it := range r.UserProfileItem {
		if it.ToAccount != accounts[i] {
			return per, r.ErrorCode, true, nil
		}
		if it.ResultCode != 0 {
			continue
		}
		if len(it.ProfileItem) != len(tags) {
			return per, r.ErrorCode, true, nil
		}
		for k, p := range it.ProfileItem {
			want, _ := imsim.SeededValue(accounts[i], tags[k])
			if p.Tag != tags[k] || !bytes.Equal(p.Value, want) {
				return per, r.ErrorCode, true, nil
			}
		}
		per[i] = true
	}
	return per, r.ErrorCode, false, nil
}

func getBody(accounts, tags []string) string {
	b, _ := json.Marshal(im.GetRequest{ToAccount: accounts, TagList: tags})
	return string(b)
}

// tagMixResult is one run of the tagmix scenario.
type tagMixResult struct {
	mixed           bool
	rate            float64 // lookups answered right per second
	accountsPerCall float64
	calls           int64
	errors, wrong   int64
	maxCalls        int // calls in the busiest sliding second at the emulator
	throttled       int64
}

// tagMix is cold load from o.callers callers, each looking up one new
// account at a time, first all with one tag list, then each request with a
// random non-empty subset of four tags (in random order): the calls should
// be as full either way, and every caller must get exactly its tags.
func tagMix(o options, out io.Writer) error {
	fmt.Fprintf(out, "tagmix: %d cold callers, one tag list, then random subsets of %d tags, %v each\n", o.callers, len(mixTags), o.duration)
	for _, mixed := range []bool{false, true} {
		r, err := tagMixRun(o, mixed)
		if err != nil {
			return err
		}
		rep.tagMix = append(rep.tagMix, r)
		label := "one tag list      "
		if mixed {
			label = "random tag subsets"
		}
		fmt.Fprintf(out, "  %s: %7.0f lookups/s, %6.2f accounts per call (%d calls), errors %d, wrong %d\n",
			label, r.rate, r.accountsPerCall, r.calls, r.errors, r.wrong)
	}
	fmt.Fprintln(out)
	return nil
}

func tagMixRun(o options, mixed bool) (tagMixResult, error) {
	e, err := startEnv(o)
	if err != nil {
		return tagMixResult{}, err
	}
	defer e.stop()
	var next atomic.Int64
	next.Store(400_000)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second+o.duration)
	defer cancel()
	var measuring atomic.Bool
	var ok, errs, wrong atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for i := range o.callers {
		wg.Go(func() {
			c, err := newRawConn(e.url)
			if err != nil {
				return
			}
			defer c.close()
			rnd := rand.New(rand.NewPCG(uint64(i), 17))
			for ctx.Err() == nil {
				tags := mixTags[:1]
				if mixed {
					tags = nil
					for _, k := range rnd.Perm(len(mixTags))[:1+rnd.IntN(len(mixTags))] {
						tags = append(tags, mixTags[k])
					}
				}
				acc := []string{imsim.AccountName(int(next.Add(1)))}
				got, err := c.post(getBody(acc, tags))
				if !measuring.Load() || ctx.Err() != nil {
					continue
				}
				var per []bool
				var bad bool
				if err == nil {
					per, _, bad, err = checkAnswer(got, acc, tags)
				}
				switch {
				case err != nil:
					errs.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				case bad:
					wrong.Add(1)
				case per[0]:
					ok.Add(1)
				default:
					errs.Add(1)
				}
			}
		})
	}
	time.Sleep(time.Second)
	if err := simReset(e.simURL); err != nil {
		return tagMixResult{}, err
	}
	measuring.Store(true)
	start := time.Now()
	<-ctx.Done()
	elapsed := time.Since(start)
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return tagMixResult{}, err
	}
	wg.Wait()
	if v := firstErr.Load(); v != nil {
		fmt.Printf("  first error: %s\n", v)
	}
	return tagMixResult{mixed: mixed, rate: float64(ok.Load()) / elapsed.Seconds(), accountsPerCall: st.AccountsPerCall(),
		calls: st.Calls, errors: errs.Load(), wrong: wrong.Load(), maxCalls: st.MaxCallsPerSec, throttled: st.Throttled}, nil
}

// overloadResult is one run of the overload scenario.
type overloadResult struct {
	callers               int
	offered               float64 // lookups/s asked
	complete              float64 // lookups/s answered in complete requests
	completeReqs, refused int64   // requests answered whole; refused whole (every account 60007 or the request's error)
	partial               int64   // requests with some accounts answered and others failed
	partialWhy            string  // the failed items' result codes in partly failed requests, and their requests' times
	clientTimeouts, wrong int64
	errors                int64   // transport errors other than the client's timeout
	fetched               float64 // accounts/s the upstream served
	accountsPerCall       float64
	maxCalls              int // calls in the busiest sliding second at the emulator
	throttled             int64
	// the proxy's RSS when measuring starts, halfway and at the end
	rssStartMiB, rssMidMiB, rssEndMiB int64
}

// flatMemory reports whether the proxy's RSS stopped growing: at the end
// of the run within 15 % (and 8 MiB) of what it was halfway, or growing
// in the second half no more than the saturation run's did (sat: the
// in-process tier fills with the fetched accounts at the same rate in
// both, ~9,600 a second; about 27 MiB of RSS in 5 s) plus 5 % (and 8
// MiB): overload itself then costs no memory.
func (r overloadResult) flatMemory(sat *overloadResult) bool {
	mid, end := float64(r.rssMidMiB), float64(r.rssEndMiB)
	if end <= 1.15*mid+8 {
		return true
	}
	return sat != nil && end-mid <= max(0, float64(sat.rssEndMiB-sat.rssMidMiB))+0.05*mid+8
}

// overloadCallers is the offered load of the overload scenario: callers
// each asking 10 new accounts once a second; 3,000 is 3× what a quota of
// 100 calls/s serves, 1,100 just past it (the saturation rate).
var overloadCallers = []int{1_100, 3_000}

// overload offers cold requests of 10 new accounts each, every caller one
// request a second (a refused request does not make its caller ask
// faster), to a proxy with a 1 s request timeout, just past the quota and
// at 3× it; the client gives up after 2 s. It reports lookups/s answered
// in complete requests and requests partly failed, refused whole and timed
// out at the client.
func overload(o options, out io.Writer) error {
	fmt.Fprintf(out, "overload: callers asking 10 new accounts once a second, proxy -request-timeout 1s, client timeout 2s, %v each\n", o.duration)
	fmt.Fprintf(out, "  %7s %9s %12s %9s %8s %7s %8s %6s %6s %10s %6s %11s\n", "callers", "offered/s", "complete/s", "complete", "partial",
		"refused", "timeouts", "wrong", "errors", "fetched/s", "acc/cl", "RSS MiB start→mid→end")
	for _, n := range overloadCallers {
		r, err := overloadRun(o, n)
		if err != nil {
			return err
		}
		rep.overload = append(rep.overload, r)
		fmt.Fprintf(out, "  %7d %9.0f %12.0f %9d %8d %7d %8d %6d %6d %10.0f %6.2f %5d→%d→%d\n", r.callers, r.offered, r.complete, r.completeReqs,
			r.partial, r.refused, r.clientTimeouts, r.wrong, r.errors, r.fetched, r.accountsPerCall, r.rssStartMiB, r.rssMidMiB, r.rssEndMiB)
		if r.partialWhy != "" {
			fmt.Fprintf(out, "  %7s partly failed: %s\n", "", r.partialWhy)
		}
	}
	if len(rep.overload) == 2 {
		fmt.Fprintf(out, "  at 3×: %.1f %% of the saturation rate answered in complete requests\n", 100*rep.overload[1].complete/max(1, rep.overload[0].complete))
	}
	fmt.Fprintln(out)
	return nil
}

func overloadRun(o options, callers int) (overloadResult, error) {
	e, err := startEnvArgs(o, "-request-timeout", "1s")
	if err != nil {
		return overloadResult{}, err
	}
	defer e.stop()
	var next atomic.Int64
	next.Store(300_000) // the emulator holds user0…user999999: 30,000 a second for 8 s fit
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second+o.duration)
	defer cancel()
	var measuring atomic.Bool
	var complete, refused, partial, timeouts, wrong, errs, sent atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	var pmu sync.Mutex
	partCodes := map[int]int{} // result code of a failed item in a partly failed request → items
	var partTook []time.Duration
	tags := mixTags[:1]
	for i := range callers {
		wg.Go(func() {
			c, err := newRawConn(e.url)
			if err != nil {
				return
			}
			c.timeout = 2 * time.Second
			defer c.close()
			// Spread the callers' first requests over a second.
			time.Sleep(time.Duration(i) * time.Second / time.Duration(callers))
			for ctx.Err() == nil {
				t0 := time.Now()
				accs := make([]string, 10)
				for k := range accs {
					accs[k] = imsim.AccountName(int(next.Add(1)))
				}
				got, err := c.post(getBody(accs, tags))
				counted := measuring.Load() && ctx.Err() == nil
				var per []bool
				var bad bool
				if err == nil {
					per, _, bad, err = checkAnswer(got, accs, tags)
				}
				if counted {
					sent.Add(1)
					answered := 0
					for _, a := range per {
						if a {
							answered++
						}
					}
					var ne net.Error
					switch {
					case errors.As(err, &ne) && ne.Timeout():
						timeouts.Add(1)
					case err != nil:
						errs.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
					case bad:
						wrong.Add(1)
					case answered == len(accs):
						complete.Add(1)
					case answered == 0:
						refused.Add(1)
					default:
						partial.Add(1)
						took := time.Since(t0)
						pmu.Lock()
						for _, code := range failedCodes(got, per) {
							partCodes[code]++
						}
						partTook = append(partTook, took)
						pmu.Unlock()
					}
				}
				time.Sleep(time.Until(t0.Add(time.Second)))
			}
		})
	}
	time.Sleep(2 * time.Second)
	if err := simReset(e.simURL); err != nil {
		return overloadResult{}, err
	}
	rss0 := e.p.rssBytes() >> 20
	measuring.Store(true)
	start := time.Now()
	time.Sleep(o.duration / 2)
	rssMid := e.p.rssBytes() >> 20
	<-ctx.Done()
	elapsed := time.Since(start)
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return overloadResult{}, err
	}
	rss1 := e.p.rssBytes() >> 20
	wg.Wait()
	if v := firstErr.Load(); v != nil && !strings.Contains(v.(string), "closed") {
		fmt.Printf("  first error: %s\n", v)
	}
	sec := elapsed.Seconds()
	return overloadResult{callers: callers, offered: 10 * float64(sent.Load()) / sec, complete: 10 * float64(complete.Load()) / sec,
		completeReqs: complete.Load(), refused: refused.Load(), partial: partial.Load(), clientTimeouts: timeouts.Load(),
		wrong: wrong.Load(), errors: errs.Load(), fetched: float64(st.Accounts) / sec, accountsPerCall: st.AccountsPerCall(),
		maxCalls: st.MaxCallsPerSec, throttled: st.Throttled, rssStartMiB: rss0, rssMidMiB: rssMid, rssEndMiB: rss1,
		partialWhy: partialWords(partCodes, partTook)}, nil
}

// failedCodes is the result codes of the items per marks failed in the
// answer got (the whole answer's ErrorCode for an item it left out).
func failedCodes(got []byte, per []bool) []int {
	var r im.GetResponse
	if json.Unmarshal(got, &r) != nil {
		return nil
	}
	var codes []int
	for i, ok := range per {
		switch {
		case ok:
		case i < len(r.UserProfileItem):
			codes = append(codes, r.UserProfileItem[i].ResultCode)
		default:
			codes = append(codes, r.ErrorCode)
		}
	}
	return codes
}

// partialWords says what failed in partly failed requests: items by result
// code, and the fastest and slowest of those requests' times (from send to
// answer).
func partialWords(codes map[int]int, took []time.Duration) string {
	if len(took) == 0 {
		return ""
	}
	keys := slices.Sorted(maps.Keys(codes))
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%d items code %d", codes[k], k))
	}
	return fmt.Sprintf("%s; answered in %v–%v", strings.Join(parts, ", "),
		slices.Min(took).Round(time.Millisecond), slices.Max(took).Round(time.Millisecond))
}
