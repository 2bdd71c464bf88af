// Command loadgen measures the proxy the way a user would weigh it: it
// starts the IM emulator (bin/imsim) and the proxy (bin/proxy) as separate
// processes on loopback ports, as they would run in production, drives the
// drop-in endpoint with single-account lookups from this process, and
// prints the figures (lookups/s, accounts per call, calls in the busiest
// sliding second, throttled calls, wrong answers, latency percentiles, the
// proxy's CPU and memory). `make bench` builds the binaries first.
//
//	loadgen -scenario cold -callers 1000 -duration 10s
//	loadgen -scenario lowload
//	loadgen -scenario poisoned -duration 5s
//	loadgen -scenario hot -base HEAD~1   # beside the proxy of HEAD~1 (built into bin/prev)
//	LOADGEN_RATES=10000,38000 loadgen -scenario openhot -duration 5s
//	loadgen -scenario all
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

type options struct {
	scenario string
	callers  int
	duration time.Duration
	latency  time.Duration
	quota    int
	window   time.Duration
	bin      string
	// proxyBin is the proxy binary the scenario starts (empty: bin/proxy);
	// the previous build's scenarios set it to bin/prev/proxy.
	proxyBin string
	// pin is where the proxies run (nil: unpinned); the hot scenario sets it.
	pin *pinning

	stepDuration time.Duration
	steps        []float64 // offered lookups/s of the cold steps
}

func run(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	var o options
	fs.StringVar(&o.scenario, "scenario", "all", "direct, cold (offered load stepped), lowload, hot (against the bare handler and the -base build), coldhttp (cold with net/http callers: this build, the -base build, 3 replicas; CPU profiles), replicas (cold with 1 and 3 proxies on one Redis), outage (Redis killed under 3 replicas' cold load), fresh (change propagation across replicas), poisoned (one caller asking for unconfigured tags among 200 cold callers), forward (forwarded calls against direct; TLS handshake per call), capsim (a Zipf run beside the capacity simulator's figures for it; not in all), tagmix (cold callers asking random subsets of four tags against one tag list), overload (requests of 10 new accounts just past the quota and at 3× it), openhot (the hot scenario's open-loop runs alone, at the rates of LOADGEN_RATES, against the proxy or with LOADGEN_TARGET=bare the bare handler; a CPU profile of each into LOADGEN_PROFILE; not in all) or all")
	fs.IntVar(&o.callers, "callers", 1000, "concurrent callers (cold)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured time per scenario")
	fs.DurationVar(&o.latency, "latency", 20*time.Millisecond, "emulator latency")
	fs.IntVar(&o.quota, "quota", 100, "emulator quota and proxy -rate")
	fs.DurationVar(&o.window, "batch-window", 2*time.Millisecond, "proxy -batch-window")
	fs.StringVar(&o.bin, "bin", "bin", "folder holding the proxy and imsim binaries")
	fs.DurationVar(&o.stepDuration, "step", 4*time.Second, "how long each offered-load step runs")
	steps := fs.String("steps", "1000,2000,4000,6000,8000,9000,9500,10000,12000,15000", "offered lookups/s of the cold steps")
	reportPath := fs.String("report", "", "write the Markdown report here (plots next to it, in -plots)")
	plotDir := fs.String("plots", "docs/bench", "folder for the report's plots")
	fs.StringVar(&rep.plotExt, "plot-format", "svg", "svg or png")
	microPath := fs.String("micro", "", "go test -bench output to include in the report")
	benchstatPath := fs.String("benchstat", "", "benchstat comparison to include in the report")
	cpuprofile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	base := fs.String("base", "", "git revision whose proxy is built into -base-bin and measured beside this one in the hot and coldhttp scenarios (the previous build); empty: none")
	baseBin := fs.String("base-bin", "bin/prev", "folder for the -base build's proxy")
	fs.StringVar(&rep.profileDir, "profiles", "bin/profiles", "folder for the CPU profiles taken of the proxies (hot and coldhttp)")
	fs.StringVar(&goTool, "go", "go", "the go command (builds -base, runs go tool pprof)")
	bareAddr := fs.String("serve-bare", "", "internal: serve the bare baseline handler on this address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *bareAddr != "" {
		return serveBare(*bareAddr)
	}
	if *cpuprofile != "" {
		f, err := os.Create(*cpuprofile)
		if err != nil {
			return err
		}
		defer f.Close()
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	for _, f := range strings.Split(*steps, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || v <= 0 {
			return fmt.Errorf("-steps: %q is not a rate", f)
		}
		o.steps = append(o.steps, v)
	}
	rep.opts = o
	if *base != "" {
		rep.base = buildBase(*base, *baseBin, out)
	}
	if *microPath != "" {
		raw, err := os.ReadFile(*microPath)
		if err != nil {
			return err
		}
		rep.micro = string(raw)
	}
	if *benchstatPath != "" {
		if raw, err := os.ReadFile(*benchstatPath); err == nil {
			rep.benchstat = string(raw)
		}
	}
	if *reportPath != "" {
		rep.readPrevFresh(*reportPath)
	}
	if err := runScenario(o, out); err != nil {
		return err
	}
	if *reportPath != "" {
		if err := rep.write(*reportPath, *plotDir); err != nil {
			return err
		}
		fmt.Fprintf(out, "report written to %s (plots in %s)\n", *reportPath, *plotDir)
	}
	return nil
}

func (o options) proxyPath() string {
	if o.proxyBin != "" {
		return o.proxyBin
	}
	return filepath.Join(o.bin, "proxy")
}

func runScenario(o options, out io.Writer) error {
	fmt.Fprintf(out, "machine: %s/%s, %d CPUs, %s; emulator latency %v, quota %d/s\n\n",
		runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version(), o.latency, o.quota)
	switch o.scenario {
	case "cold":
		return coldSteps(o, out)
	case "fresh":
		return fresh(o, out)
	case "forward":
		return forward(o, out)
	case "outage":
		return outage(o, out)
	case "lowload":
		return lowLoad(o, out)
	case "hot":
		return hot(o, out)
	case "coldhttp":
		return coldHTTP(o, out)
	case "direct":
		return direct(o, out)
	case "poisoned":
		return poisoned(o, out)
	case "capsim":
		return capsimCheck(o, out)
	case "tagmix":
		return tagMix(o, out)
	case "overload":
		return overload(o, out)
	case "openhot":
		return openHot(o, out)
	case "replicas":
		if err := coldReplicas(o, out, 1); err != nil {
			return err
		}
		if err := coldReplicas(o, out, 3); err != nil {
			return err
		}
		return coldReplicas(o, out, 3, "-cross-replica")
	case "all":
		if err := direct(o, out); err != nil {
			return err
		}
		if err := coldSteps(o, out); err != nil {
			return err
		}
		if err := lowLoad(o, out); err != nil {
			return err
		}
		if err := hot(o, out); err != nil {
			return err
		}
		if err := coldHTTP(o, out); err != nil {
			return err
		}
		// Three replicas three times: the figure moves with the VM's speed
		// more than the others do (every core is saturated).
		for _, n := range []int{1, 3, 3, 3} {
			if err := coldReplicas(o, out, n); err != nil {
				return err
			}
		}
		if err := coldReplicas(o, out, 3, "-cross-replica"); err != nil {
			return err
		}
		if err := outage(o, out); err != nil {
			return err
		}
		if err := fresh(o, out); err != nil {
			return err
		}
		if err := forward(o, out); err != nil {
			return err
		}
		if err := poisoned(o, out); err != nil {
			return err
		}
		if err := tagMix(o, out); err != nil {
			return err
		}
		return overload(o, out)
	}
	return fmt.Errorf("unknown scenario %q", o.scenario)
}

// env is an emulator and a proxy in front of it, each its own process.
type env struct {
	sim    *proc
	simURL string
	p      *proc  // the first proxy
	admin  string // its admin address
	url    string // its portrait_get URL with a valid query
	direct string // the emulator's portrait_get URL with a valid query
	ps     []*proc
	urls   []string
	admins []string
	redis  *exec.Cmd
	// redisAddr is the replicas' Redis (host:port)
	redisAddr string
}

const (
	simApp = 1400000000
	simID  = im.DefaultAdministrator
	simKey = "loadgen-secret-key"
)

func startEnv(o options) (*env, error) { return startEnvArgs(o) }

// startReplicas starts a redis-server, the emulator and n proxies sharing
// the Redis (tier and limiter).
func startReplicas(o options, n int, extra ...string) (*env, error) {
	rcmd, raddr, err := startRedis()
	if err != nil {
		return nil, err
	}
	extra = append([]string{"-redis", "redis://" + raddr + "/0"}, extra...)
	e, err := startEnvArgs(o, extra...)
	if err != nil {
		rcmd.Process.Kill()
		rcmd.Wait()
		return nil, err
	}
	e.redis, e.redisAddr = rcmd, raddr
	for len(e.ps) < n {
		p, err := startServer(o.pin, o.proxyPath(), append([]string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0",
			"-upstream", e.simURL, "-sdkappid", strconv.Itoa(simApp), "-rate", strconv.Itoa(o.quota),
			"-batch-window", o.window.String(), "-log-level", "warn"}, extra...),
			[]string{"PROXY_SECRET_KEY=" + simKey}, 2)
		if err != nil {
			e.stop()
			return nil, err
		}
		e.ps = append(e.ps, p)
		e.urls = append(e.urls, "http://"+p.addrs[0]+im.PathGet+signedQuery())
		e.admins = append(e.admins, p.addrs[1])
	}
	return e, nil
}

func signSim() string { return usersig.Sign(simKey, simApp, simID, time.Now(), 24*time.Hour) }

// startEnvArgs starts the emulator and a proxy with extra proxy flags.
func startEnvArgs(o options, extra ...string) (*env, error) {
	sim, err := startProc(filepath.Join(o.bin, "imsim"), []string{"-listen", "127.0.0.1:0",
		"-quota", strconv.Itoa(o.quota), "-latency", o.latency.String()}, []string{"IMSIM_SECRET_KEY=" + simKey}, 1)
	if err != nil {
		return nil, err
	}
	simURL := "http://" + sim.addrs[0]
	p, err := startServer(o.pin, o.proxyPath(), append([]string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0",
		"-upstream", simURL, "-sdkappid", strconv.Itoa(simApp), "-rate", strconv.Itoa(o.quota),
		"-batch-window", o.window.String(), "-log-level", "warn"}, extra...), []string{"PROXY_SECRET_KEY=" + simKey}, 2)
	if err != nil {
		sim.stop()
		return nil, err
	}
	sig := usersig.Sign(simKey, simApp, simID, time.Now(), 24*time.Hour)
	q := fmt.Sprintf("?sdkappid=%d&identifier=%s&usersig=%s&random=1&contenttype=json", simApp, simID, sig)
	u := "http://" + p.addrs[0] + im.PathGet + q
	return &env{sim: sim, simURL: simURL, p: p, admin: p.addrs[1], url: u, direct: simURL + im.PathGet + q,
		ps: []*proc{p}, urls: []string{u}, admins: []string{p.addrs[1]}}, nil
}

func (e *env) stop() error {
	var errs []error
	for _, p := range e.ps {
		errs = append(errs, p.stop())
	}
	errs = append(errs, e.sim.stop())
	if e.redis != nil {
		e.redis.Process.Kill()
		e.redis.Wait()
	}
	return errors.Join(errs...)
}

// lookup asks for one account's nick and checks the answer is exactly the
// one the upstream would give for that account (byte for byte, which also
// checks the envelope).
func lookup(c poster, account string) (ok, wrong bool, err error) {
	got, err := c.post(`{"To_Account":["` + account + `"],"TagList":["Tag_Profile_IM_Nick"]}`)
	if err != nil {
		return false, false, err
	}
	want, _ := imsim.SeededValue(account, "Tag_Profile_IM_Nick")
	exp := (&im.GetResponse{ActionStatus: "OK", UserProfileItem: []im.UserProfile{{ToAccount: account,
		ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: want}}}}}).AppendJSON(nil)
	if bytes.Equal(got, exp) {
		return true, false, nil
	}
	var r im.GetResponse
	if json.Unmarshal(got, &r) == nil && r.ErrorCode != 0 {
		return false, false, fmt.Errorf("code %d: %s", r.ErrorCode, r.ErrorInfo)
	}
	return false, true, nil
}

type result struct {
	lookups, errors, wrong int64
	elapsed                time.Duration
	lat                    []time.Duration
	stats                  imsim.Stats
}

func pct(lat []time.Duration, p float64) time.Duration {
	if len(lat) == 0 {
		return 0
	}
	return lat[min(len(lat)-1, int(float64(len(lat))*p))]
}

// coldReplicas is cold against n proxies (n > 1: sharing one Redis), the
// callers spread over them; extra flags go to every proxy.
func coldReplicas(o options, out io.Writer, n int, extra ...string) error {
	var e *env
	var err error
	if n == 1 {
		e, err = startEnvArgs(o, extra...)
	} else {
		e, err = startReplicas(o, n, extra...)
	}
	if err != nil {
		return err
	}
	defer e.stop()
	var next atomic.Int64
	ctx, cancel := context.WithTimeout(context.Background(), time.Second+o.duration)
	defer cancel()
	mine := make([][]time.Duration, o.callers) // answered lookups' latencies, per caller
	loop := startColdLoop(ctx, e.urls, o.callers, &next, func(caller int, _ time.Time, d time.Duration) {
		mine[caller] = append(mine[caller], d)
	})
	time.Sleep(time.Second)
	if err := simReset(e.simURL); err != nil {
		return err
	}
	before, err := scrape(e.admin)
	if err != nil {
		return err
	}
	loop.measuring.Store(true)
	start := time.Now()
	var cpu0, cpu time.Duration
	for _, p := range e.ps {
		cpu0 += p.cpu()
	}
	<-ctx.Done()
	elapsed := time.Since(start)
	var rss int64
	for _, p := range e.ps {
		cpu += p.cpu()
		rss += p.rssBytes()
	}
	cpu -= cpu0
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return err
	}
	after, err := scrape(e.admin)
	if err != nil {
		return err
	}
	loop.wg.Wait()
	var lat []time.Duration
	perReplica := make([][]time.Duration, len(e.urls))
	for i, m := range mine {
		lat = append(lat, m...)
		perReplica[i%len(e.urls)] = append(perReplica[i%len(e.urls)], m...)
	}
	slices.Sort(lat)
	r := result{lookups: int64(len(lat)), errors: loop.errs.Load(), wrong: loop.wrong.Load(), elapsed: elapsed, lat: lat, stats: st}
	rate := float64(r.lookups) / elapsed.Seconds()
	rep.replicas = append(rep.replicas, replicaResult{n: n, flags: strings.Join(extra, " "), rate: rate, apc: st.AccountsPerCall(),
		perAccount: float64(st.Accounts) / float64(max(1, st.DistinctFetched)), maxCalls: st.MaxCallsPerSec, throttled: st.Throttled,
		errors: r.errors, wrong: r.wrong, p50: pct(lat, .5), p99: pct(lat, .99), cpuPerLookup: float64(cpu.Microseconds()) / float64(max(1, r.lookups))})
	fmt.Fprintf(out, "cold, %d replica(s)%s %v: %d callers, each one new account at a time, %v measured\n", n,
		map[bool]string{true: " on one Redis", false: ""}[n > 1], extra, o.callers, elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "  lookups/s           %8.0f  (%.1f%% of the physical limit %d)\n", rate, 100*rate/float64(o.quota*100), o.quota*100)
	fmt.Fprintf(out, "  accounts per call   %8.2f\n", st.AccountsPerCall())
	fmt.Fprintf(out, "  upstream calls/s    %8.1f\n", float64(st.Calls)/elapsed.Seconds())
	fmt.Fprintf(out, "  max calls in any sliding second %d (accepted %d), throttled %d\n", st.MaxCallsPerSec, st.MaxAcceptPerSec, st.Throttled)
	fmt.Fprintf(out, "  errors %d, wrong answers %d; upstream fetches per distinct account %.3f\n", r.errors, r.wrong,
		float64(st.Accounts)/float64(max(1, st.DistinctFetched)))
	if v := loop.firstErr.Load(); v != nil {
		fmt.Fprintf(out, "  first error: %s\n", v)
	}
	fmt.Fprintf(out, "  proxy CPU (all replicas) %.0f%% of one core (%.0fµs per lookup), RSS %d MiB\n",
		100*cpu.Seconds()/elapsed.Seconds(), float64(cpu.Microseconds())/float64(max(1, r.lookups)), rss>>20)
	fmt.Fprintf(out, "  proxy: upstream call mean %.1fms, limiter wait mean %.1fms, batch wait mean %.1fms\n",
		1000*histMean(before, after, "portrait_proxy_upstream_call_duration_seconds"), 1000*histMean(before, after, "portrait_proxy_limiter_wait_seconds"),
		1000*histMean(before, after, "portrait_proxy_batch_wait_seconds"))
	fmt.Fprintf(out, "  latency p50 %v  p90 %v  p99 %v  max %v\n", pct(lat, .5).Round(time.Millisecond), pct(lat, .9).Round(time.Millisecond),
		pct(lat, .99).Round(time.Millisecond), pct(lat, 1).Round(time.Millisecond))
	if n > 1 {
		for i, l := range perReplica {
			slices.Sort(l)
			fmt.Fprintf(out, "  replica %d: %6.0f lookups/s, p50 %v p99 %v\n", i, float64(len(l))/elapsed.Seconds(),
				pct(l, .5).Round(time.Millisecond), pct(l, .99).Round(time.Millisecond))
		}
	}
	fmt.Fprintln(out)
	return nil
}

// coldLoop is callers in a closed loop, each lookup a new account.
type coldLoop struct {
	measuring   atomic.Bool // outcomes count only while set
	errs, wrong atomic.Int64
	firstErr    atomic.Value
	wg          sync.WaitGroup
}

// startColdLoop runs callers until ctx ends, caller i on urls[i%len(urls)],
// each asking account next+1. While measuring, every right answer is
// handed to ok from its caller's goroutine (so state per caller needs no
// lock): the caller, when the answer came, and how long it took.
func startColdLoop(ctx context.Context, urls []string, callers int, next *atomic.Int64, ok func(caller int, end time.Time, d time.Duration)) *coldLoop {
	return startColdLoopWith(ctx, rawDial, urls, callers, next, ok)
}

// startColdLoopWith is startColdLoop with the callers' client made by dial.
func startColdLoopWith(ctx context.Context, dial func(url string) (poster, error), urls []string, callers int, next *atomic.Int64,
	ok func(caller int, end time.Time, d time.Duration)) *coldLoop {
	l := &coldLoop{}
	for i := range callers {
		l.wg.Go(func() {
			c, err := dial(urls[i%len(urls)])
			if err != nil {
				l.firstErr.CompareAndSwap(nil, err.Error())
				return
			}
			defer c.close()
			for ctx.Err() == nil {
				t0 := time.Now()
				good, bad, err := lookup(c, imsim.AccountName(int(next.Add(1))))
				end := time.Now()
				if !l.measuring.Load() || ctx.Err() != nil {
					continue
				}
				switch {
				case err != nil:
					l.errs.Add(1)
					l.firstErr.CompareAndSwap(nil, err.Error())
				case bad:
					l.wrong.Add(1)
				case good:
					ok(i, end, end.Sub(t0))
				}
			}
		})
	}
	return l
}

// lowLoad: one caller at a time, through the proxy and straight to the
// emulator; the difference is what the proxy adds.
func lowLoad(o options, out io.Writer) error {
	e, err := startEnv(o)
	if err != nil {
		return err
	}
	defer e.stop()
	n := 0
	measure := func(url string, base int) ([]time.Duration, error) {
		c, err := newRawConn(url)
		if err != nil {
			return nil, err
		}
		defer c.close()
		var lat []time.Duration
		deadline := time.Now().Add(o.duration / 4)
		for i := 0; time.Now().Before(deadline) || i < 20; i++ {
			time.Sleep(15 * time.Millisecond) // stay well under the quota: one call per lookup
			a := imsim.AccountName(base + i)
			t0 := time.Now()
			ok, _, err := lookup(c, a)
			if err != nil || !ok {
				return nil, errors.Join(err, fmt.Errorf("lookup of %s not answered right", a))
			}
			lat = append(lat, time.Since(t0))
		}
		slices.Sort(lat)
		return lat, nil
	}
	direct, err := measure(e.direct, 900_000)
	if err != nil {
		return err
	}
	n = len(direct)
	before, err := scrape(e.admin)
	if err != nil {
		return err
	}
	via, err := measure(e.url, 950_000)
	if err != nil {
		return err
	}
	after, err := scrape(e.admin)
	if err != nil {
		return err
	}
	added := pct(via, .5) - pct(direct, .5)
	rep.lowload = &lowloadResult{direct: pct(direct, .5), via: pct(via, .5), added: added}
	fmt.Fprintf(out, "low load: one caller, one new account at a time (%d and %d lookups)\n", n, len(via))
	fmt.Fprintf(out, "  direct to emulator  p50 %v  p99 %v\n", pct(direct, .5).Round(10*time.Microsecond), pct(direct, .99).Round(10*time.Microsecond))
	fmt.Fprintf(out, "  through the proxy   p50 %v  p99 %v\n", pct(via, .5).Round(10*time.Microsecond), pct(via, .99).Round(10*time.Microsecond))
	fmt.Fprintf(out, "  proxy: batch wait mean %.2fms, limiter wait mean %.2fms, upstream call mean %.2fms, request mean %.2fms\n",
		1000*histMean(before, after, "portrait_proxy_batch_wait_seconds"), 1000*histMean(before, after, "portrait_proxy_limiter_wait_seconds"),
		1000*histMean(before, after, "portrait_proxy_upstream_call_duration_seconds"), 1000*histMean(before, after, "portrait_proxy_request_duration_seconds"))
	fmt.Fprintf(out, "  added by the proxy  p50 %v (batch window %v; target ≤ window + 1ms = %v)\n\n", added.Round(10*time.Microsecond), o.window, o.window+time.Millisecond)
	_ = strconv.Itoa
	return nil
}

// direct is what users do today: every lookup is its own portrait_get call
// straight to the emulator. It measures lookups answered per second and
// how many were throttled.
func direct(o options, out io.Writer) error {
	e, err := startEnv(o)
	if err != nil {
		return err
	}
	defer e.stop()
	var ok, throttled, other atomic.Int64
	var next atomic.Int64
	next.Store(600_000)
	ctx, cancel := context.WithTimeout(context.Background(), o.duration/2)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	for range 50 {
		wg.Go(func() {
			c, err := newRawConn(e.direct)
			if err != nil {
				other.Add(1)
				return
			}
			defer c.close()
			for ctx.Err() == nil {
				good, _, err := lookup(c, imsim.AccountName(int(next.Add(1))))
				switch {
				case good:
					ok.Add(1)
				case err != nil && strings.Contains(err.Error(), "code 60007"):
					throttled.Add(1)
				default:
					other.Add(1)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	rep.direct = &directResult{rate: float64(ok.Load()) / elapsed.Seconds(), throttledPerSec: float64(throttled.Load()) / elapsed.Seconds()}
	fmt.Fprintf(out, "direct (what users do today): 50 callers, one portrait_get call per lookup, straight to the emulator, %v\n", elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "  lookups/s answered  %8.0f\n  throttled calls/s   %8.0f\n  other failures      %8d\n\n",
		float64(ok.Load())/elapsed.Seconds(), float64(throttled.Load())/elapsed.Seconds(), other.Load())
	return nil
}
