// Command capsim sizes a fleet of proxies for a workload. It replays a
// synthetic workload — a lookup rate over a Zipf-distributed audience, a
// tag mix, profile changes — through the proxy's own cache rules in
// simulated time (package capacity: each replica's in-process tier is a
// cache.Local, records are made, merged and judged fresh by package
// cache's code, batching uses the batcher's parameters) and prints per-tier
// hit ratios, upstream calls per second against the quota, Redis commands
// and memory, and the replicas (cores) the measured CPU figures ask for.
//
// It is seeded and deterministic (the same flags and -seed print the same
// figures), except that a full in-process tier evicts a record sampled in
// Go's randomized map order, so runs that evict agree only statistically.
//
// A 1M-lookups/s workload runs in seconds: lookups of an account that is
// fresh on a replica are counted in bulk up to its fresh deadline instead
// of one by one, and beyond the -exact most popular accounts the audience
// is a systematic sample of ranks (-sample accounts in all), each standing
// for the ranks around it; the in-process tier is scaled with the sample
// (SHARDS). See docs/capacity.md for the model and worked examples.
//
//	capsim -rate 100000 -accounts 1000000 -skew 0.9
//	capsim -rate 1000000 -accounts 100000000 -skew 1 -replicas 0 -ttl 5m
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/capacity"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "capsim:", err)
		os.Exit(2)
	}
}

// run parses args, simulates and prints the figures on out; what varies
// between identical runs (the wall time taken) goes to errOut.
func run(args []string, out, errOut io.Writer) error {
	fs := flag.NewFlagSet("capsim", flag.ContinueOnError)
	fs.SetOutput(out)
	var w capacity.Workload
	var sc capacity.SimConfig
	fs.Float64Var(&w.Rate, "rate", 10_000, "lookups per second, fleet-wide (single-account requests)")
	fs.IntVar(&w.Accounts, "accounts", 1_000_000, "audience: accounts looked up, by a Zipf law over their popularity ranks")
	fs.Float64Var(&w.Skew, "skew", 1, "Zipf exponent s (rank k asked with probability ∝ k^-s; 0: uniform)")
	fs.Float64Var(&w.Missing, "missing", 0, "share of the audience that does not exist (answered \"not found\", kept -negative-ttl)")
	tags := fs.String("tags", "Tag_Profile_IM_Nick:1", "tag mix: TAG+TAG:weight,… (each lookup asks for one of these tag sets)")
	defTags := fs.String("default-tags", "", "proxy -default-tags: comma list fetched with every call")
	fs.Float64Var(&w.ChangeRate, "changes", 0, "profile changes per second, fleet-wide (spread over accounts as their lookups are)")
	mode := fs.String("change-mode", "apply", "how changes reach the caches: apply (portrait_set or signed callback), invalidate (unsigned callback), none (TTL only)")
	fs.IntVar(&w.Replicas, "replicas", 1, "proxy replicas (lookups spread evenly); 0: as many as the CPU model asks for")
	fs.IntVar(&w.LocalAccounts, "local-accounts", cache.DefaultLocalAccounts, "proxy -local-accounts: each replica's in-process tier (-1: none)")
	fs.BoolVar(&w.Redis, "redis", true, "a shared Redis tier behind the replicas")
	fs.DurationVar(&w.TTL, "ttl", cache.DefaultTTL, "proxy -ttl")
	fs.DurationVar(&w.StaleTTL, "stale-ttl", cache.DefaultStaleTTL, "proxy -stale-ttl")
	fs.DurationVar(&w.NegativeTTL, "negative-ttl", cache.DefaultNegativeTTL, "proxy -negative-ttl")
	fs.Float64Var(&w.Quota, "quota", 100, "upstream calls per second for the app (proxy -rate)")
	fs.DurationVar(&w.Hold, "hold", 25*time.Millisecond, "one upstream call, sent to answered")
	fs.DurationVar(&w.Window, "batch-window", 0, "proxy -batch-window (0: the batcher's default)")
	fs.IntVar(&w.BatchMax, "batch-max", 0, "proxy -batch-max (0: the batcher's default)")
	fs.Uint64Var(&sc.Seed, "seed", 1, "random seed")
	fs.DurationVar(&sc.Warmup, "warmup", 3*time.Minute, "simulated time before counting")
	fs.DurationVar(&sc.Duration, "duration", 2*time.Minute, "simulated time counted")
	fs.IntVar(&sc.Exact, "exact", 2_000, "most popular accounts simulated one by one")
	fs.IntVar(&sc.Sample, "sample", 200_000, "accounts simulated in all (the rest of the audience is sampled)")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	if w.Tags, err = parseTags(*tags); err != nil {
		return err
	}
	if *defTags != "" {
		w.DefaultTags = strings.Split(*defTags, ",")
	}
	w.ChangeMode = capacity.ChangeMode(*mode)
	k := capacity.Measured
	start := time.Now()
	auto := w.Replicas == 0
	if auto {
		w.Replicas = 1
	}
	r, err := capacity.Simulate(w, sc)
	if err != nil {
		return err
	}
	z := capacity.Sized(r, k)
	// The in-process tiers' hit ratio depends on how many replicas share
	// the lookups: size, then simulate again with that many, until stable.
	for i := 0; auto && z.Replicas != w.Replicas && i < 4; i++ {
		w.Replicas = z.Replicas
		if r, err = capacity.Simulate(w, sc); err != nil {
			return err
		}
		z = capacity.Sized(r, k)
	}
	if *asJSON {
		e := json.NewEncoder(out)
		e.SetIndent("", "  ")
		return e.Encode(struct {
			Result *capacity.Result
			Size   capacity.Size
		}{r, z})
	}
	capacity.Report(out, r, z, k)
	fmt.Fprintf(out, "simulated %v in %d steps\n", sc.Warmup+sc.Duration, r.Events)
	fmt.Fprintf(errOut, "took %v\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// parseTags reads TAG+TAG:weight,…
func parseTags(s string) ([]capacity.TagSet, error) {
	var out []capacity.TagSet
	for _, part := range strings.Split(s, ",") {
		set, weight, ok := strings.Cut(strings.TrimSpace(part), ":")
		wt := 1.0
		if ok {
			v, err := strconv.ParseFloat(weight, 64)
			if err != nil || v <= 0 {
				return nil, fmt.Errorf("-tags: %q: the weight must be a positive number", part)
			}
			wt = v
		}
		if set == "" {
			return nil, fmt.Errorf("-tags: %q: no tags", part)
		}
		out = append(out, capacity.TagSet{Tags: strings.Split(set, "+"), Weight: wt})
	}
	return out, nil
}
