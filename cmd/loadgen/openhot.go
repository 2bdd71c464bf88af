package main

import (
	"cmp"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// openHot is the hot scenario's open-loop part alone, for looking into
// latency at a given rate: the proxy on the servers' CPU, warmed, then
// open-loop runs at each rate of LOADGEN_RATES (lookups/s, comma
// separated; default 10000,20000,40000), with the server's and the
// generator's CPU and, when LOADGEN_PROFILE names a folder, a CPU profile
// of the proxy during each run.
func openHot(o options, out io.Writer) error {
	const warm = 20_000
	pin, unpin := pinHot()
	defer unpin()
	o.pin = pin
	e, err := startEnvArgs(o, "-pprof")
	if err != nil {
		return err
	}
	defer e.stop()
	if err := warmUp(e.url, warm); err != nil {
		return err
	}
	url, p, admin := e.url, e.p, e.admin
	if os.Getenv("LOADGEN_TARGET") == "bare" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		bare, err := startServer(o.pin, self, []string{"-serve-bare", "127.0.0.1:0"}, nil, 1)
		if err != nil {
			return err
		}
		defer bare.stop()
		url, p, admin = "http://"+bare.addrs[0]+im.PathGet+signedQuery(), bare, ""
	}
	rates := []float64{10_000, 20_000, 40_000}
	if v := os.Getenv("LOADGEN_RATES"); v != "" {
		rates = rates[:0]
		for _, f := range strings.Split(v, ",") {
			r, err := strconv.ParseFloat(f, 64)
			if err != nil {
				return err
			}
			rates = append(rates, r)
		}
	}
	fmt.Fprintf(out, "open loop, %s in-process hits over %d warm accounts, %v each; %s\n", cmp.Or(os.Getenv("LOADGEN_TARGET"), "proxy"), warm, o.duration, pin.words())
	rng := rand.New(rand.NewPCG(3, 5))
	for _, r := range rates {
		var prof chan *profile
		if dir := os.Getenv("LOADGEN_PROFILE"); dir != "" && admin != "" {
			prof = make(chan *profile, 1)
			go func() {
				time.Sleep(time.Second)
				prof <- takeProfile(admin, max(1, int(o.duration.Seconds())-2), dir, fmt.Sprintf("openhot-%.0f", r))
			}()
		}
		var s *step
		slow := slowHandled(admin, func() {
			cpu0 := p.cpu()
			s = openLoop([]string{url}, r, o.duration, maxConns, hotOpenConns, func(int64) string { return imsim.AccountName(rng.IntN(warm)) })
			s.cpu = (p.cpu() - cpu0).Seconds() / s.elapsed.Seconds()
		})
		fmt.Fprintf(out, "  %6.0f/s offered: %6.0f/s answered, errors %d, not sent %d, p50 %v p90 %v p99 %v p99.9 %v max %v; server CPU %.0f%% (%.1f µs/lookup), generator CPU %.0f%%\n",
			s.offered, s.rate(), s.errors+s.shed, s.unsent, pct(s.lat, .5).Round(10*time.Microsecond), pct(s.lat, .9).Round(10*time.Microsecond),
			pct(s.lat, .99).Round(10*time.Microsecond), pct(s.lat, .999).Round(10*time.Microsecond), pct(s.lat, 1).Round(10*time.Microsecond),
			100*s.cpu, 1e6*s.cpu/max(1, s.rate()), 100*s.genCPU)
		fmt.Fprintf(out, "    dispatched late by the generator: p50 %v p90 %v p99 %v p99.9 %v\n", pct(s.lags, .5).Round(10*time.Microsecond),
			pct(s.lags, .9).Round(10*time.Microsecond), pct(s.lags, .99).Round(10*time.Microsecond), pct(s.lags, .999).Round(10*time.Microsecond))
		if slow >= 0 {
			fmt.Fprintf(out, "    handled in over 0.5 ms (request read to answer built, before its write): %.3f %% of requests\n", 100*slow)
		}
		if prof != nil {
			p := <-prof
			fmt.Fprintf(out, "    profile %s %s\n", p.path, p.note)
		}
	}
	return nil
}

// slowHandled runs run and returns the share of the requests the proxy at
// admin answered meanwhile whose handler took over 0.5 ms (from the
// request read to the answer built, before it is written: its
// request_duration_seconds); -1
// when admin is "" or its metrics cannot be read.
func slowHandled(admin string, run func()) float64 {
	if admin == "" {
		run()
		return -1
	}
	m0, err0 := scrape(admin)
	run()
	m1, err1 := scrape(admin)
	const h = "portrait_proxy_request_duration_seconds"
	n := m1[h+"_count"] - m0[h+"_count"]
	if err0 != nil || err1 != nil || n <= 0 {
		return -1
	}
	k := h + `_bucket{le="0.0005"}`
	return (n - (m1[k] - m0[k])) / n
}

// selfCPU is the CPU time this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
