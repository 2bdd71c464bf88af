package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// hotOpenConns are the keep-alive connections the hot open-loop runs open
// before their clock starts: many more than the lookups in flight at any
// rate a server keeps up with (rate × latency).
const hotOpenConns = 256

// serveBare is the baseline: a server that only decodes the request JSON
// and encodes the answer JSON, as the proxy does, with the value computed
// in place. It runs in its own process (loadgen -serve-bare ADDR) so it
// is measured like the proxy.
func serveBare(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("bare handler on http://%s\n", ln.Addr())
	// The proxy's API server settings (proxy/build.go), so that the two
	// differ only in what their handlers do.
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 60 * time.Second,
		IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10, Handler: bareHandler()}
	return srv.Serve(ln)
}

// bareHandler is the bare handler's: decode, compute, encode.
func bareHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(http.MaxBytesReader(nil, r.Body, 1<<20))
		var req struct {
			ToAccount []json.RawMessage `json:"To_Account"`
			TagList   []json.RawMessage `json:"TagList"`
		}
		resp := &im.GetResponse{ActionStatus: "OK", UserProfileItem: []im.UserProfile{}, FailAccount: []string{}, InvalidAccount: []string{}}
		if err := json.Unmarshal(raw, &req); err == nil {
			for _, a := range req.ToAccount {
				var account string
				json.Unmarshal(a, &account)
				it := im.UserProfile{ToAccount: account, ProfileItem: []im.ProfileItem{}}
				for _, t := range req.TagList {
					var tag string
					json.Unmarshal(t, &tag)
					if v, ok := imsim.SeededValue(account, tag); ok {
						it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: tag, Value: v})
					}
				}
				resp.UserProfileItem = append(resp.UserProfileItem, it)
			}
		}
		b := resp.AppendJSON(nil)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
	})
}

// startRedis runs a throwaway redis-server on a free loopback port.
func startRedis() (*exec.Cmd, string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return startRedisOn(port)
}

// startRedisOn starts an empty redis-server on port of the loopback
// address and waits for it to answer.
func startRedisOn(port int) (*exec.Cmd, string, error) {
	dir, err := os.MkdirTemp("", "loadgen-redis")
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir)
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("redis-server: %w (install it: apt-get install -y redis-server)", err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	c := redis.NewClient(&redis.Options{Addr: addr})
	defer c.Close()
	for i := 0; ; i++ {
		if c.Ping(context.Background()).Err() == nil {
			return cmd, addr, nil
		}
		if i == 100 {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, "", fmt.Errorf("redis-server did not answer")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type hotResult struct {
	name      string
	rate      float64
	p50, p99  time.Duration
	cpu       float64 // cores used by the server process
	errs      int64
	wrong     int64
	extra     string
	perLookup float64 // server CPU µs per lookup
	rssMiB    int64
	hitRatio  float64 // -1: not a proxy
}

// hotRun drives url with callers closed-loop lookups of random warm
// accounts for d and checks every answer.
// picker chooses the next account for a caller.
type picker func(rng *rand.Rand) string

func uniform(warm int) picker {
	return func(rng *rand.Rand) string { return imsim.AccountName(rng.IntN(warm)) }
}

// zipfian picks warm accounts with Zipf's law (s = 1.1): a few are hot.
func zipfian(warm int) picker {
	return func(rng *rand.Rand) string {
		return imsim.AccountName(int(rand.NewZipf(rng, 1.1, 1, uint64(warm-1)).Uint64()))
	}
}

// mixed is 90 % zipfian warm accounts and 10 % never-seen ones.
func mixed(warm int, next *atomic.Int64) picker {
	z := zipfian(warm)
	return func(rng *rand.Rand) string {
		if rng.IntN(10) == 0 {
			return imsim.AccountName(int(next.Add(1)))
		}
		return z(rng)
	}
}

func hotRun(url string, callers, warm int, d time.Duration, server *proc, admin string) (hotResult, error) {
	return hotRunWith(url, callers, uniform(warm), d, server, admin)
}

// hitRatio is the share of accounts answered from a cache tier (fresh or
// stale) between two scrapes of a proxy's metrics.
func hitRatio(before, after map[string]float64) float64 {
	d := func(k string) float64 { return after[k] - before[k] }
	hits := 0.0
	for _, tier := range []string{"local", "redis"} {
		for _, res := range []string{"hit", "stale"} {
			hits += d(`portrait_proxy_cache_lookups_total{result="` + res + `",tier="` + tier + `"}`)
		}
	}
	total := 0.0
	for k := range after {
		if strings.HasPrefix(k, "portrait_proxy_lookups_total{") {
			total += d(k)
		}
	}
	if total <= 0 {
		return 0
	}
	return hits / total
}

func hotRunWith(url string, callers int, pick picker, d time.Duration, server *proc, admin string) (hotResult, error) {
	var before map[string]float64
	if admin != "" {
		before, _ = scrape(admin)
	}
	var lookups, errs, wrong atomic.Int64
	var mu sync.Mutex
	var lat []time.Duration
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	cpu0 := server.cpu()
	start := time.Now()
	for w := range callers {
		wg.Go(func() {
			c, err := newRawConn(url)
			if err != nil {
				errs.Add(1)
				return
			}
			defer c.close()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			var mine []time.Duration
			for ctx.Err() == nil {
				a := pick(rng)
				t0 := time.Now()
				ok, bad, err := lookup(c, a)
				switch {
				case err != nil:
					errs.Add(1)
				case bad:
					wrong.Add(1)
				case ok:
					lookups.Add(1)
					mine = append(mine, time.Since(t0))
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := (server.cpu() - cpu0).Seconds() / elapsed.Seconds()
	slices.Sort(lat)
	n := lookups.Load()
	res := hotResult{rate: float64(n) / elapsed.Seconds(), p50: pct(lat, .5), p99: pct(lat, .99), cpu: cpu,
		errs: errs.Load(), wrong: wrong.Load(), perLookup: cpu * elapsed.Seconds() * 1e6 / float64(max(1, n)),
		rssMiB: server.rssBytes() >> 20, hitRatio: -1}
	if admin != "" {
		if after, err := scrape(admin); err == nil && before != nil {
			res.hitRatio = hitRatio(before, after)
		}
	}
	return res, nil
}

// medianRun returns the run with the median rate.
func medianRun(runs []hotResult) hotResult {
	s := slices.Clone(runs)
	slices.SortFunc(s, func(a, b hotResult) int { return cmp.Compare(a.rate, b.rate) })
	return s[len(s)/2]
}

// warmUp looks up accounts user0…user<n-1> through url, 100 per request.
func warmUp(url string, n int) error {
	c, err := newRawConn(url)
	if err != nil {
		return err
	}
	defer c.close()
	for i := 0; i < n; i += 100 {
		var accs []string
		for k := i; k < min(n, i+100); k++ {
			accs = append(accs, imsim.AccountName(k))
		}
		body, _ := json.Marshal(im.GetRequest{ToAccount: accs, TagList: []string{"Tag_Profile_IM_Nick"}})
		got, err := c.post(string(body))
		if err != nil {
			return err
		}
		var r im.GetResponse
		if err := json.Unmarshal(got, &r); err != nil || r.ErrorCode != 0 {
			return fmt.Errorf("warm-up answer %.200s", got)
		}
	}
	return nil
}

// hot measures the hit path: a bare decode/encode handler, the proxy
// serving from its in-process tier, and the proxy serving from Redis alone
// (in-process tier off), all in this run, and prints the ratios.
func hot(o options, out io.Writer) error {
	const warm = 20_000
	callers := 64
	var results []hotResult

	self, err := os.Executable()
	if err != nil {
		return err
	}
	// Servers on one CPU, this process (and the emulator and Redis it
	// starts) on another, for every run below.
	pin, unpin := pinHot()
	defer unpin()
	o.pin, rep.hotPin = pin, pin
	bare, err := startServer(o.pin, self, []string{"-serve-bare", "127.0.0.1:0"}, nil, 1)
	if err != nil {
		return err
	}
	sig := signedQuery()
	bareURL := "http://" + bare.addrs[0] + im.PathGet + sig
	defer bare.stop()
	results = append(results, hotResult{}) // the bare handler's, measured alongside the proxy below
	prev, prevProfiled := startPrevHot(o, warm)
	if prev != nil {
		defer prev.stop()
	}

	for _, mode := range []string{"local", "redis"} {
		extraArgs := []string{"-pprof"}
		var rcmd *exec.Cmd
		var raddr string
		if mode == "redis" {
			if rcmd, raddr, err = startRedis(); err != nil {
				return err
			}
			extraArgs = []string{"-redis", "redis://" + raddr + "/0", "-local-accounts", "-1"}
		}
		e, err := startEnvArgs(o, extraArgs...)
		if err != nil {
			return err
		}
		err = func() error {
			defer e.stop()
			if err := warmUp(e.url, warm); err != nil {
				return err
			}
			var rc *redis.Client
			if mode == "redis" {
				rc = redis.NewClient(&redis.Options{Addr: raddr})
				defer rc.Close()
				deadline := time.Now().Add(10 * time.Second)
				for rc.DBSize(context.Background()).Val() < warm && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
			}
			before, err := scrape(e.admin)
			if err != nil {
				return err
			}
			calls0, _ := simStats(context.Background(), e.simURL)
			var r hotResult
			if mode == "local" {
				// The bare handler, the proxy and the previous build's proxy
				// in turns, three rounds each, medians: the VM's speed drifts
				// over seconds, and a ratio of two runs made minutes apart
				// would measure the drift. Each round starts with another
				// server, so that none always runs first.
				var bares, proxies, prevs []hotResult
				for round := range 3 {
					for k := range 3 {
						url, p, admin, into := bareURL, bare, "", &bares
						switch (round + k) % 3 {
						case 1:
							url, p, admin, into = e.url, e.p, e.admin, &proxies
						case 2:
							if prev == nil {
								continue
							}
							url, p, admin, into = prev.url, prev.p, prev.admin, &prevs
						}
						res, err := hotRun(url, callers, warm, o.duration/4, p, admin)
						if err != nil {
							return err
						}
						*into = append(*into, res)
					}
				}
				results[0] = medianRun(bares)
				results[0].name = "bare decode+encode handler"
				r = medianRun(proxies)
				rep.hotRounds = [][3]float64{}
				for i := range bares {
					rep.hotRounds = append(rep.hotRounds, [3]float64{bares[i].rate, proxies[i].rate, 0})
					if prevs != nil {
						rep.hotRounds[i][2] = prevs[i].rate
					}
				}
				if prevs != nil {
					pv := medianRun(prevs)
					pv.name = rep.base.name() + ", in-process tier hits"
					rep.hotPrev = &pv
				}
				rep.hotProfiles = hotProfiles(o, e, prev, prevProfiled, callers, warm)
			} else if r, err = hotRun(e.url, callers, warm, o.duration/2, e.p, e.admin); err != nil {
				return err
			}
			after, err := scrape(e.admin)
			if err != nil {
				return err
			}
			calls1, _ := simStats(context.Background(), e.simURL)
			requests := after[`portrait_proxy_requests_total{result="ok"}`] - before[`portrait_proxy_requests_total{result="ok"}`]
			r.name = "proxy, in-process tier hits"
			r.extra = fmt.Sprintf("upstream calls during the run: %d", calls1.Calls-calls0.Calls)
			if mode == "local" {
				results = append(results, r)
				// Open loop at fractions of the closed-loop maximum.
				rng := rand.New(rand.NewPCG(3, 5))
				pick := func(int64) string { return imsim.AccountName(rng.IntN(warm)) }
				for _, f := range []float64{.25, .5, .75, 1} {
					var s *step
					slow := slowHandled(e.admin, func() {
						cpu0 := e.p.cpu()
						s = openLoop([]string{e.url}, f*r.rate, o.duration/4, maxConns, hotOpenConns, pick)
						s.cpu = (e.p.cpu() - cpu0).Seconds() / s.elapsed.Seconds()
					})
					s.slowHandled = slow
					rep.hotSteps = append(rep.hotSteps, s)
				}
				z, err := hotRunWith(e.url, callers, zipfian(warm), o.duration/2, e.p, e.admin)
				if err != nil {
					return err
				}
				z.name = "proxy, Zipf(1.1) over the warm accounts"
				results = append(results, z)
				var next atomic.Int64
				next.Store(700_000)
				c0, _ := simStats(context.Background(), e.simURL)
				m, err := hotRunWith(e.url, callers, mixed(warm, &next), o.duration/2, e.p, e.admin)
				if err != nil {
					return err
				}
				c1, _ := simStats(context.Background(), e.simURL)
				m.name = "proxy, mixed: 90% Zipf warm, 10% cold"
				m.extra = fmt.Sprintf("upstream calls %d, %.1f accounts per call, max %d in a sliding second, throttled %d",
					c1.Calls-c0.Calls, float64(c1.Accounts-c0.Accounts)/float64(max(1, c1.Served-c0.Served)), c1.MaxCallsPerSec, c1.Throttled-c0.Throttled)
				r = m
			}
			if mode == "redis" {
				r.name = "proxy, Redis tier hits (in-process tier off)"
				trips := after["portrait_proxy_redis_round_trips_total"] - before["portrait_proxy_redis_round_trips_total"]
				var mem int64
				for i := range 200 {
					mem += rc.MemoryUsage(context.Background(), "pp:v2:"+strconv.Itoa(simApp)+":{"+imsim.AccountName(i)+"}").Val()
				}
				r.extra += fmt.Sprintf("; Redis round trips per request %.2f; Redis MEMORY USAGE %d bytes per cached account+tag (1 tag)",
					trips/max(1, requests), mem/200)
			}
			results = append(results, r)
			return nil
		}()
		if rcmd != nil {
			rcmd.Process.Kill()
			rcmd.Wait()
		}
		if err != nil {
			return err
		}
	}

	if len(rep.hotSteps) > 1 {
		rng := rand.New(rand.NewPCG(3, 5))
		cpu0 := bare.cpu()
		s := openLoop([]string{bareURL}, rep.hotSteps[1].offered, o.duration/4, maxConns, hotOpenConns, func(int64) string { return imsim.AccountName(rng.IntN(warm)) })
		s.cpu = (bare.cpu() - cpu0).Seconds() / s.elapsed.Seconds()
		rep.bareHalf = s
		if prev != nil {
			cpu0 := prev.p.cpu()
			s := openLoop([]string{prev.url}, rep.hotSteps[1].offered, o.duration/4, maxConns, hotOpenConns, func(int64) string { return imsim.AccountName(rng.IntN(warm)) })
			s.cpu = (prev.p.cpu() - cpu0).Seconds() / s.elapsed.Seconds()
			rep.prevHalf = s
		}
	}
	rep.hot = results
	printHot(out, results, callers, warm, o.duration/2, pin)
	return nil
}

// printHot prints the hot scenario's figures.
func printHot(out io.Writer, results []hotResult, callers, warm int, d time.Duration, pin *pinning) {
	fmt.Fprintf(out, "hot: %d callers, random lookups over %d warm accounts, %v each; %s\n", callers, warm, d, pin.words())
	base := results[0].rate
	if rep.hotPrev != nil {
		results = slices.Insert(slices.Clone(results), 2, *rep.hotPrev)
	}
	for _, r := range results {
		fmt.Fprintf(out, "  %-46s %8.0f lookups/s  ratio %.2f  p50 %v  p99 %v  server CPU %.0f%% (%.0fµs/lookup)  errors %d wrong %d\n",
			r.name, r.rate, r.rate/base, r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond), 100*r.cpu, r.perLookup, r.errs, r.wrong)
		if r.extra != "" {
			fmt.Fprintf(out, "  %-46s %s\n", "", r.extra)
		}
	}
	for _, s := range append(rep.hotSteps, rep.bareHalf, rep.prevHalf) {
		if s == nil {
			continue
		}
		fmt.Fprintf(out, "  open loop %6.0f/s offered: %6.0f/s answered, errors %d, not sent %d, p50 %v  p90 %v  p99 %v  max %v, server CPU %.0f%%, generator CPU %.0f%%, dispatched late p99 %v\n",
			s.offered, s.rate(), s.errors+s.shed, s.unsent, pct(s.lat, .5).Round(10*time.Microsecond), pct(s.lat, .9).Round(10*time.Microsecond),
			pct(s.lat, .99).Round(10*time.Microsecond), pct(s.lat, 1).Round(10*time.Microsecond), 100*s.cpu, 100*s.genCPU, pct(s.lags, .99).Round(10*time.Microsecond))
	}
	fmt.Fprintln(out)
}

func signedQuery() string {
	return fmt.Sprintf("?sdkappid=%d&identifier=%s&usersig=%s&random=1&contenttype=json", simApp, simID, signSim())
}

// startPrevHot starts the previous build's proxy (with its own emulator)
// for the hot scenario and warms it; nil when there is no previous build or
// it does not start, with a note saying why.
func startPrevHot(o options, warm int) (e *env, profiled bool) {
	if !rep.base.ok() {
		return nil, false
	}
	po := o
	po.proxyBin = rep.base.proxy
	e, profiled, err := startProfiled(po)
	if err != nil {
		rep.base.note("hot: the previous build did not start: %v", err)
		return nil, false
	}
	if !profiled {
		rep.base.note("the previous build has no -pprof flag: no profile of it")
	}
	if err := warmUp(e.url, warm); err != nil {
		e.stop()
		rep.base.note("hot: warming the previous build failed: %v", err)
		return nil, false
	}
	return e, profiled
}

// hotProfiles takes a CPU profile of this build's proxy (cur) and of the
// previous build's (prev, when there is one) under the rounds' load, each
// during a closed-loop run of its own after the rounds, so the profiler's
// cost is in no figure.
func hotProfiles(o options, cur, prev *env, prevProfiled bool, callers, warm int) [2]*profile {
	secs := profileSeconds(o)
	var out [2]*profile
	for i, e := range []*env{cur, prev} {
		switch {
		case e == nil:
			continue
		case i == 1 && !prevProfiled:
			out[i] = &profile{note: "that build has no -pprof flag"}
			continue
		}
		done := make(chan *profile, 1)
		go func() {
			time.Sleep(500 * time.Millisecond) // the callers connected
			done <- takeProfile(e.admin, secs, rep.profileDir, []string{"hot-current", "hot-previous"}[i])
		}()
		hotRun(e.url, callers, warm, time.Duration(secs)*time.Second+time.Second, e.p, "")
		out[i] = <-done
	}
	return out
}
