package main

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// report collects what the scenarios measured, for docs/benchmarks.md.
type report struct {
	opts      options
	started   time.Time
	direct    *directResult
	coldSteps []*step
	lowload   *lowloadResult
	hot       []hotResult
	hotRounds [][3]float64 // bare, proxy, previous build's proxy (0: none) lookups/s of each interleaved round
	hotSteps  []*step      // the proxy, open loop, at fractions of its closed-loop maximum
	bareHalf  *step        // the bare handler, open loop, at half the proxy's maximum
	hotPrev   *hotResult   // the previous build's proxy, median of its rounds
	prevHalf  *step        // the previous build's proxy, open loop, at half this build's maximum
	// hotProfiles are CPU profiles of this build's proxy and the previous
	// one's under the hot rounds' load.
	hotProfiles [2]*profile
	hotPin      *pinning // where the hot scenario's servers and generator ran (nil: no hot scenario)
	coldHTTP    []coldHTTPResult
	base        *baseBuild // nil: no previous build asked for
	profileDir  string
	prevFresh   [2]time.Duration // the last report's fresh p99s (set, callback); 0: unknown
	replicas    []replicaResult
	fresh       *freshResult
	freshPrev   *freshResult // the previous build's, in the same run
	outage      *outageResult
	poisoned    []poisonedResult
	tagMix      []tagMixResult
	overload    []overloadResult
	forward     *forwardResult
	micro       string // go test -bench output
	benchstat   string // comparison with the previous run
	plotExt     string // svg or png
}

var rep = &report{started: time.Now()}

type directResult struct{ rate, throttledPerSec float64 }

type lowloadResult struct{ direct, via, added time.Duration }

type replicaResult struct {
	n                        int
	flags                    string
	rate, apc, perAccount    float64
	maxCalls                 int
	throttled, errors, wrong int64
	p50, p99                 time.Duration
	cpuPerLookup             float64
}

type freshResult struct {
	sets, callbacks int
	setLat, cbLat   []time.Duration // sorted
	feedMean        float64
	fetchesPer      int
	callbacksSent   int64
}

func machineFacts() string {
	model := "unknown CPU"
	if raw, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(raw), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if raw, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(raw), "\n") {
			if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				var kb int64
				fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
				mem = fmt.Sprintf(", %.0f GiB RAM", float64(kb)/(1<<20))
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	redisVer := "redis-server (not found)"
	if out, err := execOutput("redis-server", "--version"); err == nil {
		redisVer = strings.TrimSpace(out)
		if i := strings.Index(redisVer, " sha="); i > 0 {
			redisVer = redisVer[:i]
		}
	}
	return fmt.Sprintf("%d CPUs (%s)%s, Linux %s, %s/%s, %s, %s", runtime.NumCPU(), model, mem,
		strings.TrimSpace(string(kernel)), runtime.GOOS, runtime.GOARCH, runtime.Version(), redisVer)
}

func ms(d time.Duration) string {
	switch {
	case d >= 100*time.Millisecond:
		return fmt.Sprintf("%.0f ms", d.Seconds()*1000)
	case d >= 10*time.Millisecond:
		return fmt.Sprintf("%.1f ms", d.Seconds()*1000)
	default:
		return fmt.Sprintf("%.2f ms", d.Seconds()*1000)
	}
}

func thousands(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func ifMissed(ok bool, why string) string {
	if ok {
		return ""
	}
	return why
}

func span(lo, hi float64, f string) string {
	if fmt.Sprintf(f, lo) == fmt.Sprintf(f, hi) {
		return fmt.Sprintf(f, lo)
	}
	return fmt.Sprintf(f+" – "+f, lo, hi)
}

func yes(ok bool) string {
	if ok {
		return "met"
	}
	return "**missed**"
}

// saturation returns the highest cold rate measured in this run: by the
// open-loop steps, or closed loop with one proxy.
func (r *report) saturation() float64 {
	best := 0.0
	for _, s := range r.coldSteps {
		best = max(best, s.rate())
	}
	for _, rr := range r.replicas {
		if rr.n == 1 {
			best = max(best, rr.rate)
		}
	}
	return best
}

type microResult struct {
	pkg, name, ns, bytes, allocs, other string
	// allocsN is the median allocs/op, allocsLookup the median of a
	// benchmark's own allocs/lookup metric; -1 when not reported.
	allocsN, allocsLookup float64
}

var microWhat = map[string]string{
	"Verify":               "UserSig check: inflate, JSON, HMAC",
	"AppendJSON":           "answer encoding, hand encoder (one item, two tags)",
	"EncodingJSONBaseline": "the same answer with encoding/json",
	"Coalesce":             "one account through the batcher (64 goroutines, instant upstream)",
	"Hit":                  "Get served by the in-process tier (a fresh answers slice)",
	"HitPath":              "HTTP handler + cache hit, no network",
	"HitPathHandler":       "HitPath without the harness's request and recorder per lookup",
	"HitPathFront":         "the whole hit path as served: a keep-alive request's bytes in, the answer's bytes out, through the front (in-memory connection)",
	"Hits":                 "Hits: the in-process tier's answer into the caller's reused buffers (the handler's first try)",
	"Miss":                 "one new account through the cache's flight to a Loader answering in groups of 100",
	"Forward":              "a forwarded API call through the proxy to an instant emulator",
}

func microRuns(out string) int {
	counts := map[string]int{}
	best := 0
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "Benchmark") {
			counts[f[0]]++
			best = max(best, counts[f[0]])
		}
	}
	return best
}

// parseMicro reads go test -bench output into one row per benchmark with
// the median of each figure.
func parseMicro(out string) []microResult {
	type acc struct {
		pkg    string
		values map[string][]float64
		units  []string
	}
	var order []string
	byName := map[string]*acc{}
	pkg := ""
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "pkg: "); ok {
			pkg = strings.TrimPrefix(v, "github.com/portrait-proxy/portrait-proxy/")
			continue
		}
		f := strings.Fields(l)
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := strings.TrimPrefix(f[0], "Benchmark")
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i]
		}
		a := byName[pkg+" "+name]
		if a == nil {
			a = &acc{pkg: pkg, values: map[string][]float64{}}
			byName[pkg+" "+name] = a
			order = append(order, pkg+" "+name)
		}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			if _, ok := a.values[f[i+1]]; !ok {
				a.units = append(a.units, f[i+1])
			}
			a.values[f[i+1]] = append(a.values[f[i+1]], v)
		}
	}
	median := func(v []float64) float64 {
		v = append([]float64(nil), v...)
		slices.Sort(v)
		return v[len(v)/2]
	}
	var rows []microResult
	for _, k := range order {
		a := byName[k]
		m := microResult{pkg: a.pkg, name: strings.TrimPrefix(k, a.pkg+" "), allocsN: -1, allocsLookup: -1}
		var other []string
		for _, u := range a.units {
			v := median(a.values[u])
			switch u {
			case "ns/op":
				m.ns = thousands(v)
				if v < 1000 {
					m.ns = strconv.FormatFloat(v, 'f', 1, 64)
				}
			case "B/op":
				m.bytes = thousands(v)
			case "allocs/op":
				m.allocs, m.allocsN = thousands(v), v
			case "allocs/lookup":
				m.allocsLookup = v
				other = append(other, strconv.FormatFloat(v, 'f', 2, 64)+" "+u)
			default:
				other = append(other, strconv.FormatFloat(v, 'f', 2, 64)+" "+u)
			}
		}
		m.other = strings.Join(other, ", ")
		rows = append(rows, m)
	}
	return rows
}

// stepNear returns the cold step whose offered load is closest to v.
func stepNear(steps []*step, v float64) *step {
	var best *step
	for _, s := range steps {
		if best == nil || math.Abs(s.offered-v) < math.Abs(best.offered-v) {
			best = s
		}
	}
	return best
}

// write renders docs/benchmarks.md into path and its plots into plotDir
// (linked relative to path).
func (r *report) write(path, plotDir string) error {
	if err := os.MkdirAll(plotDir, 0o755); err != nil {
		return err
	}
	rel, _ := filepath.Rel(filepath.Dir(path), plotDir)
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	o := r.opts
	limit := float64(o.quota * 100)
	p("# Benchmarks\n\n")
	p("Generated by `make bench` (`bin/loadgen -scenario all -report docs/benchmarks.md`) on %s (the load scenarios took %s). Do not edit by hand:\n",
		r.started.UTC().Format("2006-01-02 15:04 MST"), time.Since(r.started).Round(time.Second))
	p("run `make bench` again.\n\n")
	p("**Machine:** %s. The load generator, the emulator, Redis and the proxies all share these cores, so every figure\n", machineFacts())
	p("includes the load generator's own CPU%s; the machine is a shared VM, so runs vary by a few per cent.\n\n", r.hotPinAside())
	p("**Setup:** the emulator (`bin/imsim`: %v added latency, quota %d calls/s over a sliding second, 100 accounts per call)\n", o.latency, o.quota)
	p("and each proxy (`bin/proxy`, `-rate %d`, `-batch-window %v`) run as separate processes on loopback. Lookups are\n", o.quota, o.window)
	p("single-account portrait_get calls to the drop-in endpoint over keep-alive HTTP/1.1, and every answer is compared\n")
	p("byte for byte with what the upstream would answer for that account. Offered-load runs are open loop: lookup *i*\n")
	p("is due at *start + i/rate* and is sent then, whatever happened to earlier ones, and its latency runs from when it\n")
	p("was due (no coordinated omission).\n\n")

	r.writeTargets17(p)
	earlier := len(b.String())
	p("## Earlier targets, still checked\n\n| target | measured | | why, where missed |\n|---|---|---|---|\n")
	header := len(b.String())
	sat := r.saturation()
	if len(r.coldSteps) > 0 {
		p("| cold: ≥ 98%% of the physical limit (%s lookups/s) | %s lookups/s (%.1f%%) | %s | %s |\n", thousands(0.98*limit), thousands(sat), 100*sat/limit, yes(sat >= 0.98*limit),
			ifMissed(sat >= 0.98*limit, "the quota guarantee bounds it at quota / (1 s + hold time); see Cold"))
		// Saturated steps: the offered load exceeds what was answered.
		var at, above []*step
		for _, s := range r.coldSteps {
			switch {
			case s.offered >= 1.15*sat:
				above = append(above, s)
			case s.offered >= sat:
				at = append(at, s)
			}
		}
		for _, group := range []struct {
			name  string
			steps []*step
		}{{"at the limit", at}, {"above it", above}} {
			if len(group.steps) == 0 {
				continue
			}
			lo, hi, ok := 101.0, 0.0, true
			var offered []string
			for _, s := range group.steps {
				lo, hi = min(lo, s.accountsPerCall), max(hi, s.accountsPerCall)
				ok = ok && s.accountsPerCall >= 99
				offered = append(offered, thousands(s.offered))
			}
			p("| cold: ≥ 99 accounts per call at saturation (%s) | %s (offered %s/s) | %s | %s |\n", group.name, span(lo, hi, "%.2f"), strings.Join(offered, ", "), yes(ok),
				ifMissed(ok, "offered ≈ capacity: the queue is short, so a call leaves when its token comes, before it is full"))
		}
		n := stepNear(r.coldSteps, 0.9*sat)
		p("| cold: p99 ≤ 1 s at 90%% of saturation | %s at %s/s offered | %s | |\n", ms(pct(n.lat, .99)), thousands(n.offered), yes(pct(n.lat, .99) <= time.Second))
	}
	var three []replicaResult
	for _, rr := range r.replicas {
		if rr.n == 3 && rr.flags == "" {
			three = append(three, rr)
		}
	}
	if len(three) > 0 {
		rates := make([]float64, len(three))
		var runs []string
		worst := 0.0
		for i, rr := range three {
			rates[i] = rr.rate
			runs = append(runs, thousands(rr.rate))
			worst = max(worst, rr.perAccount)
		}
		slices.Sort(rates)
		med := rates[len(rates)/2]
		p("| 3 replicas: ≥ 9,000 lookups/s | median %s (runs: %s) | %s | %s |\n", thousands(med), strings.Join(runs, ", "), yes(med >= 9000),
			ifMissed(med >= 9000, "three proxies, Redis, the emulator and the generator share the two cores; see Replicas"))
		p("| 3 replicas: ≤ 1.01 upstream fetches per distinct account | %.3f (worst run) | %s | |\n", worst, yes(worst <= 1.01))
	}
	if u := r.outage; u != nil {
		ok := u.maxCalls <= o.quota && u.throttled == 0 && u.errors == 0 && u.wrong == 0
		p("| Redis killed under 3 replicas: the quota holds, nothing fails | max %d calls in a sliding s, %d throttled, %d errors, %d wrong; %s lookups/s during the outage | %s | |\n",
			u.maxCalls, u.throttled, u.errors, u.wrong, thousands(u.during), yes(ok))
	}
	if len(b.String()) == header { // no row: no table
		s := b.String()[:earlier]
		b.Reset()
		b.WriteString(s)
	} else {
		p("\n")
	}

	// Baselines.
	if r.direct != nil || len(r.hot) > 0 || r.base.ok() {
		p("## Baselines, measured in this run\n\n")
	}
	if r.direct != nil {
		p("- **What users do today** — one portrait_get call per lookup, straight to the emulator, 50 callers: %s lookups/s\n", thousands(r.direct.rate))
		p("  answered, %s calls/s throttled. The proxy answers %.0f× as many from the same quota.\n", thousands(r.direct.throttledPerSec), sat/max(1, r.direct.rate))
	}
	if len(r.hot) > 0 {
		p("- **The hit-path floor** — a bare handler that only decodes the request JSON and encodes the answer JSON, in its own\n")
		p("  process with the proxy's API server settings (timeouts, header limit): %s lookups/s closed loop (64 callers), p50 %s, p99 %s, %.0f µs of server CPU per lookup\n", thousands(r.hot[0].rate), ms(r.hot[0].p50), ms(r.hot[0].p99), r.hot[0].perLookup)
		p("  (%s).\n", r.hotPin.words())
	}
	if r.base.ok() {
		p("- **The previous build** — the proxy of %s, measured beside this one: next section.\n", r.base.short())
	}
	if r.direct != nil || len(r.hot) > 0 || r.base.ok() {
		p("\n")
	}
	r.writeComparison(p)

	// Cold.
	if len(r.coldSteps) > 0 {
		p("## Cold: every lookup a new account, offered load stepped (1 proxy, in-process tier)\n\n")
		p("Each step offers a constant rate for %v; the physical limit is %s lookups/s (%d calls × 100 accounts).\n\n", o.stepDuration, thousands(limit), o.quota)
		p("| offered/s | answered/s | accounts/call | max calls in a sliding s | throttled | shed (60007) | errors | not sent | wrong | p50 | p90 | p99 | max | proxy CPU | proxy RSS |\n")
		p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, s := range r.coldSteps {
			p("| %s | %s | %.2f | %d | %d | %d | %d | %d | %d | %s | %s | %s | %s | %.0f%% | %d MiB |\n", thousands(s.offered), thousands(s.rate()), s.accountsPerCall,
				s.maxCallsPerSec, s.throttled, s.shed, s.errors, s.unsent, s.wrong, ms(pct(s.lat, .5)), ms(pct(s.lat, .9)), ms(pct(s.lat, .99)), ms(pct(s.lat, 1)), 100*s.cpu, s.rssMiB)
		}
		p("\n![cold latency](%s/cold-latency.%s)\n![cold throughput](%s/cold-throughput.%s)\n\n", rel, r.plotExt, rel, r.plotExt)
		p("\"Not sent\": the generator had no free connection for a due lookup (it keeps at most %s open). Latencies are\n", thousands(maxConns))
		p("of right answers only; shed and failed lookups are counted, not timed.\n\n")
		p("Below the limit every offered lookup is answered and calls fill as the rate grows; above it the proxy answers\n")
		p("at the limit and refuses at once (60007, \"shed\") what its quota cannot serve before the caller's deadline,\n")
		p("instead of queueing it to time out. What bounds the answered rate is the quota guarantee itself: a call may\n")
		p("start only while fewer than %d calls are in flight or answered within the last second (answered = its first\n", o.quota)
		p("byte), so each slot cycles in 1 s + the call's hold time (%v emulator latency + scheduling): at most\n", o.latency)
		p("%d / (1 s + hold) calls per second, about %.0f lookups/s at a 25 ms hold. That is what keeps the quota exact\n", o.quota, float64(o.quota)/1.025*100)
		p("whatever the jitter; the 98%% target would need holds under 20 ms, shorter than the emulator's own latency.\n\n")
	}

	if r.lowload != nil {
		p("## Low load: one caller, one new account at a time\n\n| path | p50 |\n|---|---|\n")
		p("| direct to the emulator | %s |\n| through the proxy | %s |\n| added by the proxy | %s (batch window %v) |\n\n", ms(r.lowload.direct), ms(r.lowload.via), ms(r.lowload.added), o.window)
	}

	if len(r.hot) > 0 {
		p("## Hot: lookups of warm accounts\n\n")
		p("Closed loop, 64 callers, against the bare handler measured in the same run. The bare handler and the proxy's\n")
		p("in-process hits run in turns, three rounds of %v each, and the medians are shown (the rounds: \"This build, the\n", o.duration/4)
		p("previous build and the bare handler\" above);\n")
		p("the other runs take %v each. %s.\n\n", o.duration/2, capitalize(r.hotPin.words()))
		p("| server | lookups/s | ratio to bare | hit ratio | p50 | p99 | server CPU | CPU per lookup | RSS | errors | wrong | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, h := range r.hot {
			hr := "—"
			if h.hitRatio >= 0 {
				hr = fmt.Sprintf("%.3f", h.hitRatio)
			}
			p("| %s | %s | %.2f | %s | %s | %s | %.0f%% | %.0f µs | %d MiB | %d | %d | %s |\n", h.name, thousands(h.rate), h.rate/r.hot[0].rate, hr, ms(h.p50), ms(h.p99),
				100*h.cpu, h.perLookup, h.rssMiB, h.errs, h.wrong, h.extra)
		}
		if len(r.hotSteps) > 0 {
			p("\nOpen loop at fractions of the proxy's closed-loop maximum (in-process tier hits, uniform over the warm accounts):\n\n")
			p("| server | offered/s | answered/s | errors | not sent | p50 | p90 | p99 | max | server CPU | generator CPU | dispatched late, p99 | handled in over 0.5 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
			row := func(name string, s *step) {
				p("| %s | %s | %s | %d | %d | %s | %s | %s | %s | %.0f%% | %.0f%% | %s | %s |\n", name, thousands(s.offered), thousands(s.rate()), s.errors+s.shed, s.unsent,
					ms(pct(s.lat, .5)), ms(pct(s.lat, .9)), ms(pct(s.lat, .99)), ms(pct(s.lat, 1)), 100*s.cpu, 100*s.genCPU, ms(pct(s.lags, .99)), s.slowWords())
			}
			for _, s := range r.hotSteps {
				row("proxy", s)
			}
			if r.bareHalf != nil {
				row("bare handler", r.bareHalf)
			}
			p("\nThe load generator offers each lookup when it is due, over a warm pool of %d keep-alive connections, one worker each\n", hotOpenConns)
			p("(a lookup finding every worker busy waits for the first free one); latency runs from when the lookup was due.\n")
			p("*Dispatched late* is the generator's lateness in handing a lookup to the workers: its timers and its one core, and,\n")
			p("once %s lookups wait for a worker, the server's backlog. It is in the latency too. *Handled in over 0.5 ms* is the\n", thousands(float64(openQueue)))
			p("proxy's share of requests whose handler, from the request read to the answer built (its write not included), took\n")
			p("longer (its `request_duration_seconds`).\n")
			p("\n![hot latency](%s/hot-latency.%s)\n\n", rel, r.plotExt)
		}
		p("The hit path costs the handler's JSON work plus auth (a verified UserSig is remembered up to 5 minutes) and\n")
		if r.hotPin.on() {
			p("one sharded map read. Every run in this section has the servers on CPU %d and the load generator on CPU %d\n", r.hotPin.server, r.hotPin.gen)
			p("(the rounds, the open-loop runs including the bare handler's and the previous build's, Zipf, mixed and the\n")
			p("Redis tier, whose redis-server runs on the generator's CPU): a server's CPU is of its one core (at most\n")
			p("100 %%), and the ratios compare the servers alone, not servers competing with the generator for the cores.\n\n")
		} else {
			p("one sharded map read. On this machine the load generator takes a large share of the cores, so the\n")
			p("ratio is of servers competing for the same CPU with it.\n\n")
		}
	}

	if len(r.replicas) > 0 {
		p("## Replicas on one Redis (shared limiter and tier), cold load spread over them\n\n")
		p("Closed loop, %d callers, %v measured.\n\n", o.callers, o.duration)
		p("| replicas | flags | lookups/s | accounts/call | max calls in a sliding s | throttled | errors | wrong | fetches per distinct account | p50 | p99 | proxy CPU per lookup |\n")
		p("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, rr := range r.replicas {
			p("| %d | %s | %s | %.2f | %d | %d | %d | %d | %.3f | %s | %s | %.0f µs |\n", rr.n, rr.flags, thousands(rr.rate), rr.apc, rr.maxCalls, rr.throttled, rr.errors, rr.wrong, rr.perAccount, ms(rr.p50), ms(rr.p99), rr.cpuPerLookup)
		}
		p("\nOne proxy and three are both bound by the quota: the shared limiter spaces the grants of all replicas\n")
		p("together 1/rate apart in its Redis script, so three replicas keep calls as full and as evenly spread as one,\n")
		p("and hands the slots out first come, first served across replicas, so none waits much longer than another.\n")
		p("(Before that, each replica spaced only its own grants: three filled the window in a third of a second and\n")
		p("stalled the rest of it — p99 633 ms and 96.9 accounts per call — and their figure followed the VM's speed,\n")
		p("7,200 – 9,500 lookups/s over one day. With every process pinned to one core the spaced version measured\n")
		p("9,490.) Cold load has no overlap between replicas, so cross-replica coalescing saves nothing in it and costs a\n")
		p("claim per miss; when the same accounts are missed on three replicas at once (`TestCrossReplicaCoalescing`)\n")
		p("it cuts upstream fetches from 120 to 40 for 40 accounts.\n\n")
	}

	if u := r.outage; u != nil {
		p("## Redis killed under load\n\n")
		p("Three replicas on one Redis, %d callers, cold, closed loop. Redis is killed %d s in and started again, empty, on\n", o.callers, u.killAt)
		p("the same address %d s in. While it is gone each replica uses its fallback share of the rate (`-rate-fallback-share`,\n", u.reviveAt)
		p("0.3: 90 %% of the quota for three), after one window without calls (the shared window may have been full).\n\n")
		p("| phase | lookups/s |\n|---|---|\n| before | %s |\n| Redis down (from its 2nd second) | %s |\n| Redis back (from its 3rd second) | %s |\n\n",
			thousands(u.before), thousands(u.during), thousands(u.after))
		var secs []string
		for _, v := range u.perSecond {
			secs = append(secs, thousands(float64(v)))
		}
		p("Answered in each second: %s. Max %d calls in any sliding second at the emulator, %d throttled, %d errors,\n", strings.Join(secs, ", "), u.maxCalls, u.throttled, u.errors)
		p("%d wrong answers.\n\n", u.wrong)
	}

	if f := r.fresh; f != nil {
		p("## Fresh after writes: how long other replicas serve the old value\n\n")
		p("Three replicas on one Redis, every replica holding the account in its in-process tier. For a portrait_set\n")
		p("through replica A: time from A's answer until B and C both serve the new value. For a change made by a client\n")
		p("(the emulator's callback, delivered to C): time from the change until A, B and C all serve it.\n\n")
		p("| build | change | n | p50 | p99 | max |\n|---|---|---|---|---|---|\n")
		builds := []*freshResult{f, r.freshPrev}
		for i, name := range []string{"this build", r.base.name()} {
			x := builds[i]
			if x == nil {
				continue
			}
			p("| %s | portrait_set through A, until B and C serve it | %d | %s | %s | %s |\n", name, x.sets, ms(pct(x.setLat, .5)), ms(pct(x.setLat, .99)), ms(pct(x.setLat, 1)))
			p("| %s | client change → callback to C, until A, B and C serve it | %d | %s | %s | %s |\n", name, x.callbacks, ms(pct(x.cbLat, .5)), ms(pct(x.cbLat, .99)), ms(pct(x.cbLat, 1)))
		}
		p("\n")
		p("Mean feed delay reported by the replicas (`change_feed_delay_seconds`): %.2f ms. The replicas never refetched a\n", f.feedMean*1000)
		p("changed account (%d upstream fetches of changed accounts after warm-up): the change itself travels.\n\n", f.fetchesPer)
	}

	r.writePoisoned(p)
	r.writeForward(p)
	r.writeTagMix(p)
	r.writeOverload(p)
	r.writeProfiles(p)

	if r.micro != "" {
		p("## Go micro-benchmarks (`-benchmem`, medians of %d runs)\n\n", microRuns(r.micro))
		p("| package | benchmark | what | ns/op | B/op | allocs/op | other |\n|---|---|---|---|---|---|---|\n")
		for _, m := range parseMicro(r.micro) {
			p("| %s | %s | %s | %s | %s | %s | %s |\n", m.pkg, m.name, microWhat[m.name], m.ns, m.bytes, m.allocs, m.other)
		}
		p("\nRaw output: docs/bench/micro.txt (the next `make bench` compares with it).\n\n")
		if r.benchstat != "" {
			p("<details><summary>Compared with the previous <code>make bench</code> run (benchstat: previous → this run)</summary>\n\n```\n%s```\n</details>\n", r.benchstat)
		} else {
			p("No previous run to compare with (`benchstat` compares with docs/bench/micro.txt from the last `make bench`).\n")
		}
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return err
	}
	return r.plots(plotDir)
}

func (r *report) plots(dir string) error {
	if len(r.coldSteps) > 0 {
		if err := latencyPlot(filepath.Join(dir, "cold-latency."+r.plotExt), "Cold lookups: latency against offered load", r.coldSteps); err != nil {
			return err
		}
		p := plot.New()
		p.Title.Text = "Cold lookups: answered rate and accounts per call"
		p.X.Label.Text = "offered lookups/s"
		p.Y.Label.Text = "answered lookups/s"
		var ans, ideal plotter.XYs
		for _, s := range r.coldSteps {
			ans = append(ans, plotter.XY{X: s.offered, Y: s.rate()})
			ideal = append(ideal, plotter.XY{X: s.offered, Y: min(s.offered, float64(r.opts.quota*100))})
		}
		if err := addLine(p, "answered", ans, 0); err != nil {
			return err
		}
		if err := addLine(p, "ideal: min(offered, quota × 100)", ideal, 3); err != nil {
			return err
		}
		p2 := plot.New()
		p2.X.Label.Text = "offered lookups/s"
		p2.Y.Label.Text = "accounts per upstream call"
		var apc plotter.XYs
		for _, s := range r.coldSteps {
			apc = append(apc, plotter.XY{X: s.offered, Y: s.accountsPerCall})
		}
		if err := addLine(p2, "accounts per call", apc, 1); err != nil {
			return err
		}
		p2.Y.Min, p2.Y.Max = 0, 105
		if err := saveStack(filepath.Join(dir, "cold-throughput."+r.plotExt), p, p2); err != nil {
			return err
		}
	}
	if len(r.hotSteps) > 0 {
		if err := latencyPlot(filepath.Join(dir, "hot-latency."+r.plotExt), "Hot lookups (in-process tier): latency against offered load", r.hotSteps); err != nil {
			return err
		}
	}
	return nil
}

var palette = []color.Color{
	color.RGBA{R: 31, G: 119, B: 180, A: 255}, color.RGBA{R: 255, G: 127, B: 14, A: 255},
	color.RGBA{R: 44, G: 160, B: 44, A: 255}, color.RGBA{R: 128, G: 128, B: 128, A: 255},
}

func addLine(p *plot.Plot, name string, xy plotter.XYs, c int) error {
	l, pts, err := plotter.NewLinePoints(xy)
	if err != nil {
		return err
	}
	l.Color, pts.Color = palette[c], palette[c]
	pts.Shape = draw.CircleGlyph{}
	if c == 3 {
		l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
	}
	p.Add(l, pts)
	p.Legend.Add(name, l, pts)
	p.Legend.Top, p.Legend.Left = true, true
	p.Add(plotter.NewGrid())
	return nil
}

func latencyPlot(path, title string, steps []*step) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "offered lookups/s"
	p.Y.Label.Text = "latency, ms (log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = ticks125{}
	for i, q := range []float64{.5, .9, .99} {
		var xy plotter.XYs
		for _, s := range steps {
			if len(s.lat) > 0 {
				xy = append(xy, plotter.XY{X: s.offered, Y: max(0.01, pct(s.lat, q).Seconds()*1000)})
			}
		}
		if err := addLine(p, fmt.Sprintf("p%.0f", q*100), xy, i); err != nil {
			return err
		}
	}
	return p.Save(8*vg.Inch, 4.5*vg.Inch, path)
}

func saveStack(path string, top, bottom *plot.Plot) error {
	const w, h = 8 * vg.Inch, 7 * vg.Inch
	var img interface {
		vg.CanvasWriterTo
	}
	if strings.HasSuffix(path, ".png") {
		img = vgimg.PngCanvas{Canvas: vgimg.New(w, h)}
	} else {
		img = vgsvg.New(w, h)
	}
	dc := draw.New(img)
	half := h / 2
	top.Draw(draw.Crop(dc, 0, 0, half, 0))
	bottom.Draw(draw.Crop(dc, 0, 0, 0, -half))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = img.WriteTo(f)
	return err
}

func execOutput(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).Output()
	return string(out), err
}

// ticks125 marks 1, 2 and 5 times each power of ten: a log axis spanning
// less than a decade still gets labels.
type ticks125 struct{}

func (ticks125) Ticks(lo, hi float64) []plot.Tick {
	var ts []plot.Tick
	for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
		for _, m := range []float64{1, 2, 5} {
			if v := m * math.Pow(10, e); v >= lo && v <= hi {
				ts = append(ts, plot.Tick{Value: v, Label: strconv.FormatFloat(v, 'g', -1, 64)})
			}
		}
	}
	return ts
}

// slowWords is s.slowHandled for the report: "—" when not known.
func (s *step) slowWords() string {
	if s.slowHandled < 0 {
		return "—"
	}
	return fmt.Sprintf("%.3f %%", 100*s.slowHandled)
}
