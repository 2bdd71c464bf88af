package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/capacity"
	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// capsimCheck runs a workload small enough for this machine for real — two
// proxies on one Redis, open loop, Zipf over a fixed audience, from cold,
// short TTLs so that fresh, stale and expired entries all occur — and the
// capacity simulator on the same workload, and prints both side by side:
// per-tier hit ratios, accounts fetched and calls per second.
func capsimCheck(o options, out io.Writer) error {
	const (
		replicas = 2
		rate     = 3000.0
		accounts = 50_000
		skew     = 1.1
		ttl      = 5 * time.Second
		stale    = 10 * time.Second
	)
	d := o.duration
	e, err := startReplicas(o, replicas, "-ttl", ttl.String(), "-stale-ttl", stale.String())
	if err != nil {
		return err
	}
	defer e.stop()
	if err := simReset(e.simURL); err != nil {
		return err
	}
	before := make([]map[string]float64, replicas)
	for i, a := range e.admins {
		if before[i], err = scrape(a); err != nil {
			return err
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	z := rand.NewZipf(rng, skew, 1, accounts-1) // rank k+1 is account k, as capacity numbers them
	s := openLoop(e.urls, rate, d, maxConns, 0, func(int64) string { return imsim.AccountName(int(z.Uint64())) })
	st, err := simStats(context.Background(), e.simURL)
	if err != nil {
		return err
	}
	var local, redisHit, lookups, hold, holdN float64
	for i, a := range e.admins {
		after, err := scrape(a)
		if err != nil {
			return err
		}
		for k, v := range after {
			v -= before[i][k]
			switch {
			case !strings.HasPrefix(k, "portrait_proxy_cache_lookups_total"):
			case strings.Contains(k, `tier="local"`) && (strings.Contains(k, `result="hit"`) || strings.Contains(k, `result="stale"`)):
				local += v
			case strings.Contains(k, `tier="redis"`) && (strings.Contains(k, `result="hit"`) || strings.Contains(k, `result="stale"`)):
				redisHit += v
			}
			if strings.HasPrefix(k, "portrait_proxy_cache_lookups_total") && strings.Contains(k, `tier="local"`) {
				lookups += v
			}
		}
		n := after["portrait_proxy_upstream_call_duration_seconds_count"] - before[i]["portrait_proxy_upstream_call_duration_seconds_count"]
		hold += after["portrait_proxy_upstream_call_duration_seconds_sum"] - before[i]["portrait_proxy_upstream_call_duration_seconds_sum"]
		holdN += n
	}
	meanHold := time.Duration(hold / max(holdN, 1) * float64(time.Second)).Round(100 * time.Microsecond)
	secs := s.window.Seconds()
	w := capacity.Workload{Rate: rate, Accounts: accounts, Skew: skew, Replicas: replicas, Redis: true, TTL: ttl, StaleTTL: stale,
		Quota: float64(o.quota), Hold: meanHold, Window: o.window}
	t0 := time.Now()
	r, err := capacity.Simulate(w, capacity.SimConfig{Seed: 1, Duration: d, Exact: accounts})
	if err != nil {
		return err
	}
	took := time.Since(t0)
	sz := capacity.Sized(r, capacity.Measured)
	c := r.Counts
	meas := capsimRow{local: local / lookups, redis: redisHit / lookups, up: 1 - (local+redisHit)/lookups,
		fetches: float64(st.Accounts) / secs, calls: float64(st.Calls) / secs}
	simr := capsimRow{local: sz.LocalHit, redis: sz.RedisHit, up: sz.Miss, fetches: (c.Fetches + c.Refreshes) / r.Seconds, calls: sz.Calls}
	fmt.Fprintf(out, "capsim check: %d replicas on one Redis, open loop %.0f lookups/s for %v, Zipf(%g) over %d accounts from cold, -ttl %v -stale-ttl %v; mean call %v\n",
		replicas, rate, d, skew, accounts, ttl, stale, meanHold)
	fmt.Fprintf(out, "  %-22s %10s %10s %s\n", "", "measured", "simulated", "difference")
	row := func(name string, m, s float64, pct bool) {
		f := "%10.2f"
		if pct {
			m, s, f = 100*m, 100*s, "%9.2f%%"
		}
		fmt.Fprintf(out, "  %-22s "+f+" "+f+" %+.1f%%\n", name, m, s, 100*(s-m)/max(m, 1e-9))
	}
	row("in-process tier hits", meas.local, simr.local, true)
	row("Redis tier hits", meas.redis, simr.redis, true)
	row("went upstream", meas.up, simr.up, true)
	row("accounts fetched/s", meas.fetches, simr.fetches, false)
	row("upstream calls/s", meas.calls, simr.calls, false)
	fmt.Fprintf(out, "  lookups measured %.0f (errors %d, wrong %d); simulation took %v\n\n", lookups, s.errors+s.unsent+s.shed, s.wrong, took.Round(time.Millisecond))
	return nil
}

type capsimRow struct{ local, redis, up, fetches, calls float64 }
