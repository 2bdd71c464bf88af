package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"sync/atomic"
	"time"
)

// coldHTTPResult is one cold run with net/http callers.
type coldHTTPResult struct {
	name                     string
	previous                 bool // the previous build
	replicas                 int
	rate, apc                float64
	maxCalls                 int
	throttled, errors, wrong int64
	p50, p99                 time.Duration
	cpuPerLookup             float64   // proxy CPU µs per answered lookup (all replicas)
	rounds                   []float64 // each round's figure this is the median of (CPU per lookup, or lookups/s for replicas)
	rssMiB                   int64
	prof                     *profile // of the proxy after the measured window; nil: none asked
}

// profileSeconds is how long a CPU profile of a proxy runs.
func profileSeconds(o options) int { return max(2, int((o.duration * 2 / 5).Seconds())) }

// coldHTTPRounds is how many times the one-proxy runs of this build and of
// the previous build go, in turn: the cold CPU per lookup of one run moved
// by ±10 % from run to run on the 2-core VM, as much as a change is
// meant to show.
const coldHTTPRounds = 3

// coldHTTP is cold load from o.callers net/http keep-alive callers, the
// way the app servers call the proxy (the other cold scenarios use the
// raw client, which costs the shared cores less): this build with one
// proxy, the previous build with one and this build with three replicas
// on one Redis, in turn, coldHTTPRounds rounds each starting with the
// next, each reported by its median run (one proxy: by CPU per lookup,
// which its target is of; three: by lookups/s, which theirs is of). The
// first round's one-proxy runs go on under the same load for a CPU
// profile of the proxy after their measured window, so the profiler's
// cost is in no figure.
func coldHTTP(o options, out io.Writer) error {
	fmt.Fprintf(out, "cold, net/http callers: %d callers on one shared keep-alive client, each one new account at a time, %v measured\n",
		o.callers, o.duration)
	type run struct {
		name     string
		o        options
		replicas int
		profile  string
	}
	show := func(res coldHTTPResult) {
		fmt.Fprintf(out, "  %-40s %7.0f lookups/s, %6.2f accounts per call, max %d calls in a sliding s, throttled %d, errors %d, wrong %d, p50 %v p99 %v, proxy CPU %.0f µs per lookup, RSS %d MiB\n",
			res.name, res.rate, res.apc, res.maxCalls, res.throttled, res.errors, res.wrong, res.p50.Round(time.Millisecond),
			res.p99.Round(time.Millisecond), res.cpuPerLookup, res.rssMiB)
		if res.prof != nil && res.prof.note != "" {
			fmt.Fprintf(out, "  %-40s no CPU profile: %s\n", "", res.prof.note)
		}
	}
	builds := []run{{"this build", o, 1, "cold-current"}}
	if rep.base.ok() {
		po := o
		po.proxyBin = rep.base.proxy
		builds = append(builds, run{rep.base.name(), po, 1, "cold-previous"})
	}
	builds = append(builds, run{"this build, 3 replicas on one Redis", o, 3, ""})
	got := make([][]coldHTTPResult, len(builds))
	for round := range coldHTTPRounds {
		for k := range builds {
			i := (round + k) % len(builds)
			r := builds[i]
			if r.o.proxyBin != "" && got[i] == nil && round > 0 {
				continue // the previous build did not run
			}
			if round > 0 {
				r.profile = ""
			}
			res, err := coldHTTPRun(r.o, r.replicas, r.profile)
			if err != nil && r.o.proxyBin != "" {
				rep.base.note("cold (net/http): the previous build did not run: %v", err)
				continue
			}
			if err != nil {
				return err
			}
			res.name, res.previous = fmt.Sprintf("%s (round %d)", r.name, round+1), r.o.proxyBin != ""
			show(res)
			got[i] = append(got[i], res)
		}
	}
	for i, runs := range got {
		if len(runs) == 0 {
			continue
		}
		key := func(r coldHTTPResult) float64 { return r.cpuPerLookup }
		if builds[i].replicas > 1 {
			key = func(r coldHTTPResult) float64 { return r.rate }
		}
		m := medianCold(runs, key)
		m.name = builds[i].name
		rep.coldHTTP = append(rep.coldHTTP, m)
	}
	fmt.Fprintln(out)
	return nil
}

// medianCold is the median of runs by key, with every run's key (in run
// order) and the first run's profile.
func medianCold(runs []coldHTTPResult, key func(coldHTTPResult) float64) coldHTTPResult {
	s := slices.Clone(runs)
	slices.SortFunc(s, func(a, b coldHTTPResult) int { return cmp.Compare(key(a), key(b)) })
	m := s[len(s)/2]
	m.rounds = nil
	for _, r := range runs {
		m.rounds = append(m.rounds, key(r))
	}
	m.prof = runs[0].prof
	return m
}

func coldHTTPRun(o options, replicas int, profName string) (coldHTTPResult, error) {
	var e *env
	var err error
	profiled := false
	if replicas == 1 {
		e, profiled, err = startProfiled(o)
	} else {
		e, err = startReplicas(o, replicas)
	}
	if err != nil {
		return coldHTTPResult{}, err
	}
	defer e.stop()
	client := appClient(o.callers)
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var next atomic.Int64
	mine := make([][]time.Duration, o.callers) // answered lookups' latencies, per caller
	loop := startColdLoopWith(ctx, httpDial(client), e.urls, o.callers, &next, func(caller int, _ time.Time, d time.Duration) {
		mine[caller] = append(mine[caller], d)
	})
	defer loop.wg.Wait() // after cancel (deferred later, run first)
	defer cancel()
	time.Sleep(time.Second)
	if err := simReset(e.simURL); err != nil {
		return coldHTTPResult{}, err
	}
	cpu := func() (t time.Duration) {
		for _, p := range e.ps {
			t += p.cpu()
		}
		return t
	}
	cpu0 := cpu()
	loop.measuring.Store(true)
	start := time.Now()
	time.Sleep(o.duration)
	loop.measuring.Store(false)
	elapsed := time.Since(start)
	used := cpu() - cpu0
	var rss int64
	for _, p := range e.ps {
		rss += p.rssBytes()
	}
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return coldHTTPResult{}, err
	}
	var prof *profile
	switch {
	case profName != "" && profiled:
		prof = takeProfile(e.admin, profileSeconds(o), rep.profileDir, profName)
	case profName != "":
		prof = &profile{note: "that build has no -pprof flag"}
	}
	cancel()
	loop.wg.Wait()
	var lat []time.Duration
	for _, m := range mine {
		lat = append(lat, m...)
	}
	slices.Sort(lat)
	return coldHTTPResult{replicas: replicas, rate: float64(len(lat)) / elapsed.Seconds(), apc: st.AccountsPerCall(),
		maxCalls: st.MaxCallsPerSec, throttled: st.Throttled, errors: loop.errs.Load(), wrong: loop.wrong.Load(),
		p50: pct(lat, .5), p99: pct(lat, .99), cpuPerLookup: float64(used.Microseconds()) / float64(max(1, len(lat))),
		rssMiB: rss >> 20, prof: prof}, nil
}
