package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestReportTargets renders a report from made-up figures and checks that
// every issue-17 target has its row, marked met or missed by the figures.
func TestReportTargets(t *testing.T) {
	dir := t.TempDir()
	lat := []time.Duration{time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond}
	st := func(off float64) *step {
		return &step{offered: off, ok: 100, steady: 75, window: time.Second, elapsed: time.Second, lat: lat, maxCallsPerSec: 100, accountsPerCall: 99.5}
	}
	old := filepath.Join(dir, "old.md")
	os.WriteFile(old, []byte("| fresh | set: p99 1.25 ms; callback: p99 1.63 ms | measured | |"), 0o644)
	prof := &profile{path: "x.pprof", flat: "Duration: 4s\n      flat  flat%   sum%        cum   cum%\n     970ms 20.59% 20.59%      970ms 20.59%  internal/runtime/syscall/linux.Syscall6\n      70ms  1.49% 43.74%      970ms 20.59%  runtime.mallocgc (inline)\n", cum: "c\n"}
	r := &report{started: time.Now(), plotExt: "svg", profileDir: "bin/profiles",
		opts:      options{quota: 100, callers: 1000, duration: 10 * time.Second, window: 2 * time.Millisecond, stepDuration: 4 * time.Second},
		direct:    &directResult{rate: 100, throttledPerSec: 2000},
		coldSteps: []*step{st(1000), st(9000), st(10000), st(15000)},
		lowload:   &lowloadResult{direct: time.Millisecond, via: 2 * time.Millisecond, added: time.Millisecond},
		hot:       []hotResult{{name: "bare", rate: 100, hitRatio: -1}, {name: "proxy", rate: 90, hitRatio: 1}},
		hotRounds: [][3]float64{{100, 90, 80}, {100, 110, 0}, {100, 120, 90}},
		hotSteps:  []*step{st(25), st(50)}, bareHalf: st(50), prevHalf: st(50),
		hotPrev:     &hotResult{name: "prev", rate: 80},
		hotProfiles: [2]*profile{prof, {note: "that build has no -pprof flag"}},
		hotPin:      &pinning{server: 1, gen: 0, taskset: "/usr/bin/taskset"},
		coldHTTP: []coldHTTPResult{{name: "this build", replicas: 1, rate: 9000, cpuPerLookup: 73, prof: prof},
			{name: "previous", previous: true, replicas: 1, rate: 9500, cpuPerLookup: 74}, {name: "3", replicas: 3, rate: 8000}},
		base:     &baseBuild{rev: "abc", desc: "abc1234 2026-12-01 subject", proxy: "/x", dir: "bin/prev", notes: []string{"a note"}},
		replicas: []replicaResult{{n: 1, rate: 9700}, {n: 3, rate: 9600}, {n: 3, rate: 9650}, {n: 3, flags: "-cross-replica", rate: 9000}},
		fresh:    &freshResult{sets: 1, callbacks: 1, setLat: lat, cbLat: lat},
		outage:   &outageResult{},
		tagMix:   []tagMixResult{{accountsPerCall: 100}, {mixed: true, accountsPerCall: 96}},
		overload: []overloadResult{{callers: 1100, complete: 9700}, {callers: 3000, complete: 9200, partial: 68, refused: 20685, rssMidMiB: 200, rssEndMiB: 300}},
		micro:    "pkg: github.com/portrait-proxy/portrait-proxy/cache\nBenchmarkHits-2 1 189 ns/op 144 B/op 2 allocs/op\npkg: github.com/portrait-proxy/portrait-proxy/proxy\nBenchmarkHitPathFront-2 1 5000 ns/op 10 B/op 1 allocs/op\n",
	}
	r.readPrevFresh(old)
	out := filepath.Join(dir, "b.md")
	if err := r.write(out, dir); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for l := range strings.SplitSeq(string(raw), "\n") {
		if f := strings.Split(l, " | "); len(f) >= 3 && strings.HasPrefix(l, "| ") {
			rows[strings.TrimPrefix(f[0], "| ")] = f[2]
		}
	}
	for target, want := range map[string]string{
		"hot: ≥ 1.1× the bare handler's lookups/s (median of interleaved rounds)":                                                    "met", // rounds 0.90, 1.10, 1.20
		"hot: p99 ≤ 2 ms at half the maximum rate":                                                                                   "**missed**",
		"hit path: ≤ 1 allocation per lookup (micro-benchmarks)":                                                                     "**missed**", // cache Hits: 2
		"overload at 3× (3,000 callers × 10 accounts): ≥ 9,000 lookups/s answered in complete requests":                              "met",
		"overload at 3×: ≥ 95 % of the saturation rate":                                                                              "**missed**", // 9,200 of 9,700
		"overload at 3×: 0 partly failed requests, 0 client timeouts":                                                                "**missed**",
		"overload at 3×: flat memory":                                                                                                "**missed**", // 200 → 300 MiB
		"tag mixes: ≥ 97 accounts per call with random tag subsets, every caller getting exactly its tags":                           "**missed**",
		"cold: ≤ 70 ms of proxy CPU per 1,000 lookups, 1,000 net/http keep-alive callers":                                            "**missed**",
		"cold: 3 replicas on one Redis within 5 % of 1 replica":                                                                      "**missed**", // net/http 8,000 vs 9,000
		"nothing regresses: quota never exceeded":                                                                                    "met",
		"nothing regresses: 0 wrong answers in every scenario":                                                                       "met",
		"nothing regresses: freshness figures kept (p99 within 2× of the previous build's in the same run, or of the last report's)": "**missed**", // 3 ms against 1.25 ms
	} {
		if got, ok := rows[target]; !ok || got != want {
			t.Errorf("%s: %q (row present: %v), want %q", target, got, ok, want)
		}
	}
	for _, section := range []string{"## This build, the previous build and the bare handler, in one run", "### Cold, net/http callers",
		"## CPU profiles: before (previous build) and after (this build)", "linux.Syscall6 20.59%", "## Overload", "## Tag mixes", "**Note:** a note.",
		"except the hot scenario's: servers pinned to CPU 1 (`taskset -c 1`) and the load generator (all its threads, with the emulator and Redis) to CPU 0",
		"three rounds; servers pinned to CPU 1", "Every run in this section has the servers on CPU 1 and the load generator on CPU 0",
		"(rounds: 0.90, 1.10, 1.20); previous build 0.90; servers on CPU 1, generator on CPU 0 | met |"} {
		if !strings.Contains(string(raw), section) {
			t.Errorf("report without %q", section)
		}
	}
}

// The freshness target compares with the previous build measured in the
// same run when there is one, not with the last report's figures.
func TestFreshnessAgainstSameRunPrevious(t *testing.T) {
	lat := func(p99 time.Duration) []time.Duration { return []time.Duration{p99 / 4, p99} }
	for _, tc := range []struct {
		cur, prev time.Duration
		want      bool
	}{{3 * time.Millisecond, 2 * time.Millisecond, true}, {5 * time.Millisecond, 2 * time.Millisecond, false}} {
		r := &report{fresh: &freshResult{setLat: lat(tc.cur), cbLat: lat(tc.cur)}, freshPrev: &freshResult{setLat: lat(tc.prev), cbLat: lat(tc.prev)},
			prevFresh: [2]time.Duration{time.Millisecond, time.Millisecond}} // the last report's: 3 ms would miss them
		var got *bool
		r.regressionTargets(func(target, measured string, ok bool, why string) {
			if strings.HasPrefix(target, "nothing regresses: freshness") {
				got = &ok
				if !strings.Contains(measured, "previous build, same run") {
					t.Errorf("measured %q", measured)
				}
			}
		})
		if got == nil || *got != tc.want {
			t.Errorf("p99 %v against %v: met %v, want %v", tc.cur, tc.prev, got, tc.want)
		}
	}
}

// TestMedianCold: the median round by CPU per lookup stands for its build,
// with every round's figure in run order and the first round's profile.
func TestMedianCold(t *testing.T) {
	prof := &profile{path: "p"}
	runs := []coldHTTPResult{{cpuPerLookup: 75, rate: 1, prof: prof}, {cpuPerLookup: 68, rate: 2}, {cpuPerLookup: 70, rate: 3}}
	if m := medianCold(runs, func(r coldHTTPResult) float64 { return r.rate }); m.rate != 2 || !slices.Equal(m.rounds, []float64{1, 2, 3}) {
		t.Fatalf("median by rate %+v", m)
	}
	m := medianCold(runs, func(r coldHTTPResult) float64 { return r.cpuPerLookup })
	if m.cpuPerLookup != 70 || m.rate != 3 || m.prof != prof || !slices.Equal(m.rounds, []float64{75, 68, 70}) {
		t.Fatalf("median %+v", m)
	}
	if w := m.roundWords(); w != ", median of rounds 75, 68, 70" {
		t.Fatalf("roundWords %q", w)
	}
}

// TestFlatMemory: growth within 15 % (+ 8 MiB) of halfway is flat; more
// is flat only when the saturation run, filling the cache at the same
// rate, grew about as much.
func TestFlatMemory(t *testing.T) {
	sat := &overloadResult{rssMidMiB: 158, rssEndMiB: 187} // +29
	for _, c := range []struct {
		mid, end int64
		sat      *overloadResult
		want     bool
	}{
		{202, 240, nil, true},  // within 15 % + 8
		{202, 244, nil, false}, // past it, nothing to compare with
		{202, 244, sat, true},  // +42 against +29, within 5 % + 8 more
		{202, 260, sat, false}, // +58: overload's own growth
	} {
		r := overloadResult{rssMidMiB: c.mid, rssEndMiB: c.end}
		if got := r.flatMemory(c.sat); got != c.want {
			t.Errorf("%d → %d MiB (saturation run %v): flat %v, want %v", c.mid, c.end, c.sat != nil, got, c.want)
		}
	}
}
