package main

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// This file renders what issue 17 asks of the report: its targets met or
// missed and why, this build beside the previous build and the bare
// handler, CPU profiles before and after, the overload and tag-mix runs.

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}

// hotRatios are this build's and the previous build's lookups/s over the
// bare handler's in each interleaved round (previous: nil without one).
func (r *report) hotRatios() (cur, prev []float64) {
	for _, x := range r.hotRounds {
		cur = append(cur, x[1]/x[0])
		if x[2] > 0 {
			prev = append(prev, x[2]/x[0])
		}
	}
	return cur, prev
}

func ratios(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmt.Sprintf("%.2f", x))
	}
	return strings.Join(s, ", ")
}

// coldHTTPRun returns the net/http cold run of this build (or the
// previous one) with n replicas.
func (r *report) coldHTTPRun(previous bool, n int) *coldHTTPResult {
	for i := range r.coldHTTP {
		if c := &r.coldHTTP[i]; c.previous == previous && c.replicas == n {
			return c
		}
	}
	return nil
}

// freshRE finds the fresh figures of a report (this one's previous run).
var freshRE = regexp.MustCompile(`set: p99 ([0-9.]+) ms; callback: p99 ([0-9.]+) ms`)

// readPrevFresh reads the fresh p99s from the report about to be
// replaced, if it has them.
func (r *report) readPrevFresh(path string) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return
	}
	if m := freshRE.FindStringSubmatch(string(raw)); m != nil {
		set, _ := strconv.ParseFloat(m[1], 64)
		cb, _ := strconv.ParseFloat(m[2], 64)
		r.prevFresh = [2]time.Duration{time.Duration(set * float64(time.Millisecond)), time.Duration(cb * float64(time.Millisecond))}
	}
}

// top names the n entries of the profile with the most flat time, with
// their share, for a target's why; "" without a profile.
func (pr *profile) top(n int) string {
	if pr == nil || pr.flat == "" {
		return ""
	}
	var out []string
	table := false
	for l := range strings.SplitSeq(pr.flat, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) > 0 && f[0] == "flat":
			table = true
		case table && len(f) >= 6 && len(out) < n:
			name := strings.Join(f[5:], " ")
			if i := strings.LastIndexByte(strings.Fields(name)[0], '/'); i >= 0 {
				name = name[i+1:]
			}
			out = append(out, name+" "+f[1])
		}
	}
	if out == nil {
		return ""
	}
	return "; top of its profile (flat): " + strings.Join(out, ", ")
}

// writeTargets17 is the table of issue 17's targets.
func (r *report) writeTargets17(p func(string, ...any)) {
	p("## Targets (issue 17)\n\n| target | measured | | why, where missed |\n|---|---|---|---|\n")
	row := func(target, measured string, ok bool, why string) {
		p("| %s | %s | %s | %s |\n", target, measured, yes(ok), ifMissed(ok, why))
	}
	r.hotTargets(row)
	r.overloadTargets(row)
	if len(r.tagMix) == 2 {
		one, mix := r.tagMix[0], r.tagMix[1]
		ok := mix.accountsPerCall >= 97 && mix.wrong == 0 && mix.errors == 0
		row("tag mixes: ≥ 97 accounts per call with random tag subsets, every caller getting exactly its tags",
			fmt.Sprintf("%.2f accounts per call, %d wrong, %d failed (one tag list: %.2f)", mix.accountsPerCall, mix.wrong, mix.errors, one.accountsPerCall), ok,
			fmt.Sprintf("the calls of different tag sets fill apart: %.2f accounts per call against %.2f with one tag list", mix.accountsPerCall, one.accountsPerCall))
	}
	r.coldTargets(row)
	r.regressionTargets(row)
	p("\n")
}

func (r *report) hotTargets(row func(target, measured string, ok bool, why string)) {
	if len(r.hotRounds) > 0 && len(r.hot) >= 2 {
		cur, prev := r.hotRatios()
		med := median(cur)
		m := fmt.Sprintf("%.2f (rounds: %s)", med, ratios(cur))
		if prev != nil {
			m += fmt.Sprintf("; previous build %.2f", median(prev))
		}
		if r.hotPin != nil {
			m += "; " + r.hotPin.short()
		}
		row("hot: ≥ 1.1× the bare handler's lookups/s (median of interleaved rounds)", m, med >= 1.1,
			fmt.Sprintf("the hit path costs %.0f µs of server CPU per lookup against the bare handler's %.0f µs%s", r.hot[1].perLookup, r.hot[0].perLookup, r.hotProfiles[0].top(3)))
	}
	if len(r.hotSteps) > 1 {
		h := r.hotSteps[1]
		p99 := pct(h.lat, .99)
		why := "the proxy's tail at that rate; see the hot profile"
		if r.bareHalf != nil && pct(r.bareHalf.lat, .99) > 2*time.Millisecond {
			why = fmt.Sprintf("the bare handler at the same rate: p99 %s — the load generator shares the two cores", ms(pct(r.bareHalf.lat, .99)))
			if r.hotPin.on() {
				why = fmt.Sprintf("the bare handler at the same rate, pinned to the same CPU: p99 %s, its core at %.0f%% — the tail is not the proxy's alone",
					ms(pct(r.bareHalf.lat, .99)), 100*r.bareHalf.cpu)
			}
		}
		if h.slowHandled >= 0 {
			why += fmt.Sprintf("; the proxy's handler took over 0.5 ms for %s of requests, the generator dispatched lookups %s late at p99, its core at %.0f%% and the server's at %.0f%%",
				h.slowWords(), ms(pct(h.lags, .99)), 100*h.genCPU, 100*h.cpu)
		}
		row("hot: p99 ≤ 2 ms at half the maximum rate", fmt.Sprintf("%s at %s/s", ms(p99), thousands(h.offered)), p99 <= 2*time.Millisecond, why)
	}
	if r.micro == "" {
		return
	}
	var got []string
	ok, found := true, 0
	for _, m := range parseMicro(r.micro) {
		// The hit path as served: the cache's Hits (what the handler asks
		// first) and the whole proxy path, HTTP included, through the front.
		if !(m.pkg == "cache" && m.name == "Hits" || m.pkg == "proxy" && m.name == "HitPathFront") {
			continue
		}
		v, unit := m.allocsN, "allocs/op"
		if m.allocsLookup >= 0 {
			v, unit = m.allocsLookup, "allocs/lookup"
		}
		found++
		ok = ok && v >= 0 && v <= 1
		got = append(got, fmt.Sprintf("%s Benchmark%s %g %s", m.pkg, m.name, v, unit))
	}
	if found > 0 {
		row("hit path: ≤ 1 allocation per lookup (micro-benchmarks)", strings.Join(got, "; "), ok && found == 2,
			"allocations left on the hit path (cache BenchmarkHits: the tier's answer into pooled buffers; proxy BenchmarkHitPathFront: a request's bytes in, the answer's out, through the front); see the hot profile's mallocgc")
	}
}

func (r *report) overloadTargets(row func(target, measured string, ok bool, why string)) {
	if len(r.overload) == 0 {
		return
	}
	x := r.overload[len(r.overload)-1] // 3×
	sat, satWhat := r.saturation(), "the cold steps' best"
	var satRun *overloadResult
	if len(r.overload) > 1 {
		satRun = &r.overload[0]
		sat, satWhat = r.overload[0].complete, fmt.Sprintf("%s callers", thousands(float64(r.overload[0].callers)))
	}
	waste := fmt.Sprintf("the upstream fetched %s accounts/s, %s of them for requests that did not complete (%s partly failed, %s refused whole)",
		thousands(x.fetched), thousands(max(0, x.fetched-x.complete)), thousands(float64(x.partial)), thousands(float64(x.refused)))
	row(fmt.Sprintf("overload at 3× (%s callers × 10 accounts): ≥ 9,000 lookups/s answered in complete requests", thousands(float64(x.callers))),
		thousands(x.complete)+" lookups/s", x.complete >= 9000, waste)
	row("overload at 3×: ≥ 95 % of the saturation rate", fmt.Sprintf("%.1f %% of %s lookups/s (%s)", 100*x.complete/max(1, sat), thousands(sat), satWhat),
		x.complete >= 0.95*sat, waste)
	row("overload at 3×: 0 partly failed requests, 0 client timeouts", fmt.Sprintf("%d partly failed, %d client timeouts", x.partial, x.clientTimeouts),
		x.partial == 0 && x.clientTimeouts == 0, "requests admitted in part: some accounts were shed or timed out after others were served"+
			ifSome(x.partialWhy, " (failed items: %s)"))
	row("overload at 3×: flat memory", fmt.Sprintf("proxy RSS %d → %d → %d MiB (start, halfway, end)", x.rssStartMiB, x.rssMidMiB, x.rssEndMiB),
		x.flatMemory(satRun), fmt.Sprintf("RSS grew in the second half by more than 15 %% + 8 MiB, and by more than the saturation run's %s MiB + 5 %% + 8 MiB",
			satGrowth(satRun)))
}

func (r *report) coldTargets(row func(target, measured string, ok bool, why string)) {
	if c := r.coldHTTPRun(false, 1); c != nil {
		m := fmt.Sprintf("%.0f ms (%s lookups/s)%s", c.cpuPerLookup, thousands(c.rate), c.roundWords())
		if pc := r.coldHTTPRun(true, 1); pc != nil {
			m += fmt.Sprintf("; previous build %.0f ms%s", pc.cpuPerLookup, pc.roundWords())
		}
		row(fmt.Sprintf("cold: ≤ 70 ms of proxy CPU per 1,000 lookups, %s net/http keep-alive callers", thousands(float64(r.opts.callers))), m,
			c.cpuPerLookup <= 70, fmt.Sprintf("%.0f µs of proxy CPU per lookup%s", c.cpuPerLookup, c.prof.top(3)))
	}
	one, three := r.coldHTTPRun(false, 1), r.coldHTTPRun(false, 3)
	var rawOne float64
	var rawThree []float64
	for _, rr := range r.replicas {
		switch {
		case rr.n == 1 && rr.flags == "":
			rawOne = rr.rate
		case rr.n == 3 && rr.flags == "":
			rawThree = append(rawThree, rr.rate)
		}
	}
	var got []string
	ok, some := true, false
	if one != nil && three != nil {
		some = true
		ok = ok && three.rate >= 0.95*one.rate
		got = append(got, fmt.Sprintf("net/http callers: %s vs %s lookups/s (%.1f %%)%s", thousands(three.rate), thousands(one.rate), 100*three.rate/max(1, one.rate),
			ifSome(rateRounds(three), "; 3 replicas %s")))
	}
	if rawOne > 0 && rawThree != nil {
		some = true
		ok = ok && median(rawThree) >= 0.95*rawOne
		got = append(got, fmt.Sprintf("raw callers: median %s vs %s (%.1f %%)", thousands(median(rawThree)), thousands(rawOne), 100*median(rawThree)/rawOne))
	}
	if some {
		why := "three proxies, Redis, the emulator and the callers share the two cores"
		if one != nil && three != nil {
			why += fmt.Sprintf(": %.0f µs of proxy CPU per lookup for three replicas against %.0f µs for one", three.cpuPerLookup, one.cpuPerLookup)
		}
		row("cold: 3 replicas on one Redis within 5 % of 1 replica", strings.Join(got, "; "), ok, why)
	}
}

func (r *report) regressionTargets(row func(target, measured string, ok bool, why string)) {
	maxCalls, throttled, wrong := 0, int64(0), int64(0)
	add := func(m int, t, w int64) { maxCalls, throttled, wrong = max(maxCalls, m), throttled+t, wrong+w }
	for _, s := range append(slices.Clone(r.coldSteps), r.hotSteps...) {
		add(s.maxCallsPerSec, s.throttled, s.wrong)
	}
	for _, h := range r.hot {
		add(0, 0, h.wrong)
	}
	for _, rr := range r.replicas {
		add(rr.maxCalls, rr.throttled, rr.wrong)
	}
	if u := r.outage; u != nil {
		add(u.maxCalls, u.throttled, u.wrong)
	}
	for _, c := range r.coldHTTP {
		if !c.previous {
			add(c.maxCalls, c.throttled, c.wrong)
		}
	}
	for _, t := range r.tagMix {
		add(t.maxCalls, t.throttled, t.wrong)
	}
	for _, x := range r.overload {
		add(x.maxCalls, x.throttled, x.wrong)
	}
	for _, x := range r.poisoned {
		add(0, 0, x.wrong)
	}
	ok := maxCalls <= r.opts.quota && throttled == 0
	row("nothing regresses: quota never exceeded", fmt.Sprintf("max %d calls in any sliding second (quota %d), %d throttled", maxCalls, r.opts.quota, throttled), ok,
		"the limiter let more calls through than the quota allows")
	row("nothing regresses: 0 wrong answers in every scenario", fmt.Sprintf("%d wrong", wrong), wrong == 0, "an answer differed from the upstream's; see the scenario tables")
	if f := r.fresh; f != nil {
		set, cb := pct(f.setLat, .99), pct(f.cbLat, .99)
		m := fmt.Sprintf("set: p99 %s; callback: p99 %s", ms(set), ms(cb))
		ok, why := true, "replicas serve changes later than in the last report"
		switch pf := r.freshPrev; {
		case pf != nil:
			// The previous build measured in the same run: a tail moves
			// with the machine more than with the code.
			pset, pcb := pct(pf.setLat, .99), pct(pf.cbLat, .99)
			m += fmt.Sprintf(" (previous build, same run: %s; %s)", ms(pset), ms(pcb))
			ok, why = set <= 2*pset && cb <= 2*pcb, "replicas serve changes later than the previous build in the same run"
		case r.prevFresh[0] > 0:
			m += fmt.Sprintf(" (last report: %s; %s)", ms(r.prevFresh[0]), ms(r.prevFresh[1]))
			ok = set <= 2*r.prevFresh[0] && cb <= 2*r.prevFresh[1]
		}
		row("nothing regresses: freshness figures kept (p99 within 2× of the previous build's in the same run, or of the last report's)", m, ok, why)
	}
}

// writeComparison is this build beside the previous build and the bare
// handler, measured in this run.
func (r *report) writeComparison(p func(string, ...any)) {
	if r.base == nil && len(r.hotRounds) == 0 && len(r.coldHTTP) == 0 {
		return
	}
	p("## This build, the previous build and the bare handler, in one run\n\n")
	if b := r.base; b.ok() {
		p("The previous build is the proxy of `%s` (`make bench`: `BENCH_BASE`, by default the commit that last regenerated\n", b.rev)
		p("this report), built from a clean export of that revision into %s/; the emulator is this build's for both.\n", b.dir)
		if b.desc != "" {
			p("That revision: %s.\n", b.desc)
		}
		for _, n := range b.notes {
			p("\n**Note:** %s.\n", n)
		}
		p("\n")
	} else if b != nil {
		for _, n := range b.notes {
			p("**Note:** %s.\n\n", n)
		}
	} else {
		p("No previous build was measured (`bin/loadgen -base REV`; `make bench` passes `BENCH_BASE`).\n\n")
	}
	if len(r.hotRounds) > 0 && len(r.hot) > 0 {
		r.writeHotComparison(p)
	}
	if len(r.coldHTTP) > 0 {
		p("### Cold, net/http callers\n\n")
		p("%s callers, each one new account at a time, on one shared net/http client whose keep-alive pool holds a connection\n", thousands(float64(r.opts.callers)))
		p("per caller (as an app server calls the proxy), %v measured. One proxy of this build, one of the previous build and\n", r.opts.duration)
		p("three of this build on one Redis ran in turn, %d rounds, each round starting with the next; each row is the median\n", coldHTTPRounds)
		p("round, by CPU per lookup for one proxy and by lookups/s for three (every round's is in the targets table). The other\n")
		p("cold scenarios use a raw HTTP/1.1 client that costs the shared cores less.\n\n")
		p("| build | replicas | lookups/s | ratio to this build, 1 replica | accounts/call | max calls in a sliding s | throttled | errors | wrong | p50 | p99 | proxy CPU per 1,000 lookups | proxy RSS |\n")
		p("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		base := r.coldHTTPRun(false, 1)
		for _, c := range r.coldHTTP {
			ratio := "—"
			if base != nil {
				ratio = fmt.Sprintf("%.2f", c.rate/max(1, base.rate))
			}
			p("| %s | %d | %s | %s | %.2f | %d | %d | %d | %d | %s | %s | %.0f ms | %d MiB |\n", c.name, c.replicas, thousands(c.rate), ratio, c.apc,
				c.maxCalls, c.throttled, c.errors, c.wrong, ms(c.p50), ms(c.p99), c.cpuPerLookup, c.rssMiB)
		}
		p("\n")
	}
}

func (r *report) writeHotComparison(p func(string, ...any)) {
	p("### Hot: in-process tier hits\n\n")
	p("Closed loop, 64 callers, uniform over 20,000 warm accounts; the bare handler, this build and the previous build in\n")
	p("turn, %v each, three rounds; %s. Ratios are per round; the last row has the medians.\n\n", r.opts.duration/4, r.hotPin.words())
	p("| round | bare handler | this build | previous build | this / bare | previous / bare | this / previous |\n|---|---|---|---|---|---|---|\n")
	cell := func(v float64) string {
		if v <= 0 {
			return "—"
		}
		return thousands(v)
	}
	div := func(a, b float64) string {
		if a <= 0 || b <= 0 {
			return "—"
		}
		return fmt.Sprintf("%.2f", a/b)
	}
	var col [3][]float64
	var rat [3][]float64
	for i, x := range r.hotRounds {
		p("| %d | %s | %s | %s | %s | %s | %s |\n", i+1, cell(x[0]), cell(x[1]), cell(x[2]), div(x[1], x[0]), div(x[2], x[0]), div(x[1], x[2]))
		for k := range 3 {
			col[k] = append(col[k], x[k])
		}
		if x[2] > 0 {
			rat[1], rat[2] = append(rat[1], x[2]/x[0]), append(rat[2], x[1]/x[2])
		}
		rat[0] = append(rat[0], x[1]/x[0])
	}
	medRatio := func(v []float64) string {
		if v == nil {
			return "—"
		}
		return fmt.Sprintf("**%.2f**", median(v))
	}
	p("| median | %s | %s | %s | %s | %s | %s |\n\n", cell(median(col[0])), cell(median(col[1])), cell(median(col[2])),
		medRatio(rat[0]), medRatio(rat[1]), medRatio(rat[2]))
	p("| server (median round) | lookups/s | p50 | p99 | server CPU | CPU per lookup | RSS |\n|---|---|---|---|---|---|---|\n")
	for _, h := range []*hotResult{&r.hot[0], &r.hot[1], r.hotPrev} {
		if h == nil {
			continue
		}
		name := h.name
		if h == &r.hot[1] {
			name = "this build, in-process tier hits"
		}
		p("| %s | %s | %s | %s | %.0f%% | %.0f µs | %d MiB |\n", name, thousands(h.rate), ms(h.p50), ms(h.p99), 100*h.cpu, h.perLookup, h.rssMiB)
	}
	if len(r.hotSteps) > 1 {
		p("\nOpen loop at half this build's closed-loop maximum:\n\n| server | offered/s | answered/s | p50 | p90 | p99 | max | server CPU | generator CPU | dispatched late, p99 |\n|---|---|---|---|---|---|---|---|---|---|\n")
		for _, x := range []struct {
			name string
			s    *step
		}{{"bare handler", r.bareHalf}, {"this build", r.hotSteps[1]}, {"previous build", r.prevHalf}} {
			if s := x.s; s != nil {
				p("| %s | %s | %s | %s | %s | %s | %s | %.0f%% | %.0f%% | %s |\n", x.name, thousands(s.offered), thousands(s.rate()), ms(pct(s.lat, .5)), ms(pct(s.lat, .9)),
					ms(pct(s.lat, .99)), ms(pct(s.lat, 1)), 100*s.cpu, 100*s.genCPU, ms(pct(s.lags, .99)))
			}
		}
	}
	p("\n")
}

// writeProfiles is the CPU profiles' top entries, before (the previous
// build) and after (this build), for the hot and the cold path.
func (r *report) writeProfiles(p func(string, ...any)) {
	var coldPrev, coldCur *profile
	if c := r.coldHTTPRun(true, 1); c != nil {
		coldPrev = c.prof
	}
	if c := r.coldHTTPRun(false, 1); c != nil {
		coldCur = c.prof
	}
	if r.hotProfiles[0] == nil && coldCur == nil {
		return
	}
	p("## CPU profiles: before (previous build) and after (this build)\n\n")
	p("`go tool pprof -top -nodecount=12` of the proxy process, by flat and by cumulative time (module path left out of\n")
	p("names). Each profile runs %d s under the scenario's load, after its measured window, so the profiler's cost is in no\n", profileSeconds(r.opts))
	p("figure above. The profiles are in %s/ (`go tool pprof -http=: FILE` to explore them).\n\n", r.profileDir)
	for _, sec := range []struct {
		title, what string
		before      *profile
		after       *profile
	}{
		{"Hot path", "in-process tier hits, 64 closed-loop callers, uniform over the warm accounts", r.hotProfiles[1], r.hotProfiles[0]},
		{"Cold path", fmt.Sprintf("every lookup a new account, %s net/http keep-alive callers", thousands(float64(r.opts.callers))), coldPrev, coldCur},
	} {
		p("### %s (%s)\n\n", sec.title, sec.what)
		for _, side := range []struct {
			label string
			prof  *profile
		}{{"Before — " + r.base.name(), sec.before}, {"After — this build", sec.after}} {
			switch pr := side.prof; {
			case pr == nil:
				p("**%s:** not profiled.\n\n", side.label)
			case pr.flat == "":
				p("**%s:** no profile: %s.\n\n", side.label, pr.note)
			default:
				p("**%s**, by flat time (%s):\n\n```\n%s```\n\nby cumulative time:\n\n```\n%s```\n\n", side.label, pr.path, pr.flat, pr.cum)
			}
		}
	}
}

func (r *report) writeOverload(p func(string, ...any)) {
	if len(r.overload) == 0 {
		return
	}
	p("## Overload: requests of 10 new accounts, past the quota\n\n")
	p("Each caller asks 10 new accounts once a second (a refused request does not make it ask faster); the proxy runs with\n")
	p("`-request-timeout 1s`, the client gives up after 2 s; %v measured. %s callers ask just past what the quota serves (the\n", r.opts.duration, thousands(float64(overloadCallers[0])))
	p("saturation rate), %s three times it. Complete: every account answered; partly failed: some answered, others not;\n", thousands(float64(overloadCallers[len(overloadCallers)-1])))
	p("refused: none answered (refused whole). Memory is flat when the proxy's RSS at the end is within 15 %% (+ 8 MiB) of\n")
	p("halfway, or grew in the second half by no more than the saturation run's did (+ 5 %% of halfway + 8 MiB): both fill\n")
	p("the in-process tier with the accounts they fetch at the same rate, so that growth is the cache's, not overload's.\n\n")
	p("| callers | offered lookups/s | answered in complete requests/s | complete | partly failed | refused | client timeouts | wrong | errors | fetched accounts/s | accounts/call | max calls in a sliding s | proxy RSS start → halfway → end |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.overload {
		n := func(v int64) string { return thousands(float64(v)) }
		p("| %s | %s | %s | %s | %s | %s | %d | %d | %d | %s | %.2f | %d | %d → %d → %d MiB |\n", thousands(float64(x.callers)), thousands(x.offered), thousands(x.complete),
			n(x.completeReqs), n(x.partial), n(x.refused), x.clientTimeouts, x.wrong, x.errors, thousands(x.fetched), x.accountsPerCall, x.maxCalls,
			x.rssStartMiB, x.rssMidMiB, x.rssEndMiB)
	}
	p("\n")
}

func (r *report) writeTagMix(p func(string, ...any)) {
	if len(r.tagMix) == 0 {
		return
	}
	p("## Tag mixes\n\n")
	p("%s cold callers, each one new account at a time, %v measured: first all asking one tag list, then each request a\n", thousands(float64(r.opts.callers)), r.opts.duration)
	p("random non-empty subset of %d tags in random order; every answer is checked to hold exactly the tags asked.\n\n", len(mixTags))
	p("| tags | lookups/s | accounts/call | calls | max calls in a sliding s | throttled | errors | wrong |\n|---|---|---|---|---|---|---|---|\n")
	for _, t := range r.tagMix {
		name := "one tag list"
		if t.mixed {
			name = "random subsets"
		}
		p("| %s | %s | %.2f | %d | %d | %d | %d | %d |\n", name, thousands(t.rate), t.accountsPerCall, t.calls, t.maxCalls, t.throttled, t.errors, t.wrong)
	}
	p("\n")
}

// ifSome is format with s, or "" when s is.
func ifSome(s, format string) string {
	if s == "" {
		return ""
	}
	return fmt.Sprintf(format, s)
}

// roundWords lists the CPU per lookup of each round c is the median of.
func (c *coldHTTPResult) roundWords() string {
	if len(c.rounds) < 2 {
		return ""
	}
	var w []string
	for _, v := range c.rounds {
		w = append(w, fmt.Sprintf("%.0f", v))
	}
	return ", median of rounds " + strings.Join(w, ", ")
}

// rateRounds lists the lookups/s of each round c is the median of.
func rateRounds(c *coldHTTPResult) string {
	if len(c.rounds) < 2 {
		return ""
	}
	var w []string
	for _, v := range c.rounds {
		w = append(w, thousands(v))
	}
	return "median of rounds " + strings.Join(w, ", ")
}

// satGrowth is the saturation run's RSS growth in its second half, in
// MiB, for the report ("—" without one).
func satGrowth(sat *overloadResult) string {
	if sat == nil {
		return "—"
	}
	return fmt.Sprint(sat.rssEndMiB - sat.rssMidMiB)
}
