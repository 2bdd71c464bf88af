package capacity

import (
	"fmt"
	"io"
)

// Report prints a simulation and the fleet sized for it.
func Report(out io.Writer, r *Result, z Size, k Constants) {
	w := r.Workload
	fmt.Fprintf(out, "workload: %s lookups/s over %s accounts, Zipf s=%g, %d replica(s), in-process tier %s accounts each, Redis %v\n",
		num(w.Rate), num(float64(w.Accounts)), w.Skew, w.Replicas, num(float64(w.LocalAccounts)), w.Redis)
	fmt.Fprintf(out, "  ttl %v, stale %v, negative %v; changes %s/s (%s); quota %g calls/s, hold %v, batch window %v, batch max %d\n",
		w.TTL, w.StaleTTL, w.NegativeTTL, num(w.ChangeRate), w.ChangeMode, w.Quota, w.Hold, r.Batcher.Window, r.Batcher.MaxAccounts)
	fmt.Fprintf(out, "  simulated: %d accounts one by one, %d sampled in all (R=%.3g of the rest), in-process tier of %d in the sample\n\n",
		r.Exact, r.Sampled, r.TailRate, r.LocalSim)
	c := r.Counts
	pc := func(x float64) string { return fmt.Sprintf("%6.2f%%", 100*x/max(c.Lookups, 1e-300)) }
	fmt.Fprintf(out, "lookups            %12s/s\n", num(z.Lookups))
	fmt.Fprintf(out, "  in-process tier  %s  (fresh %s, stale %s, not found %s)\n", pc(c.LocalFresh+c.LocalStale+c.LocalNeg), pc(c.LocalFresh), pc(c.LocalStale), pc(c.LocalNeg))
	fmt.Fprintf(out, "  Redis tier       %s  (fresh %s, stale %s, not found %s)\n", pc(c.RedisFresh+c.RedisStale+c.RedisNeg), pc(c.RedisFresh), pc(c.RedisStale), pc(c.RedisNeg))
	fmt.Fprintf(out, "  upstream         %s  (of them joined a fetch in flight %s)\n", pc(c.RedisMiss), pc(c.Joined))
	fmt.Fprintf(out, "upstream fetches   %12s accounts/s (%s for misses, %s background refreshes); capacity of the quota %s/s\n",
		num(z.Fetches), num(c.Fetches/r.Seconds), num(c.Refreshes/r.Seconds), num(z.FetchCapacity))
	fmt.Fprintf(out, "upstream calls     %12.1f /s  = %.1f%% of the quota (%g/s), %.1f accounts per call\n", z.Calls, 100*z.QuotaUse, w.Quota, z.AccountsPerCall)
	if z.Shed > 0 || z.Dropped > 0 {
		fmt.Fprintf(out, "  QUOTA-BOUND: %s lookups/s shed (60007, %.2f%% of lookups), %s refreshes/s given up (served stale meanwhile)\n",
			num(z.Shed), 100*z.ShedShare, num(z.Dropped))
	}
	if c.Changes > 0 {
		fmt.Fprintf(out, "profile changes    %12s /s\n", num(c.Changes/r.Seconds))
	}
	fmt.Fprintf(out, "CPU                %12.2f cores at %.0f%% each → %d replica(s) (%v per in-process hit, %v per Redis hit, %v per fetched lookup)\n",
		z.Cores, 100*k.CoreBudget, z.Replicas, k.CPULocalHit, k.CPURedisHit, k.CPUCold)
	fmt.Fprintf(out, "in-process tier    %12s accounts per replica at the end, %s of heap (%s when full)\n", num(z.LocalHeld), bytes(z.LocalHeap), bytes(z.LocalHeapFull))
	if w.Redis {
		fmt.Fprintf(out, "Redis              %12s accounts in the steady state (%s held at the end), %s\n", num(z.RedisAccounts), num(c.RedisLive), bytes(z.RedisBytes))
		fmt.Fprintf(out, "  commands         %12s /s (reads %s, write-backs %s, changes %s, limiter %s); round trips ≈ %s/s\n", num(z.RedisOps),
			num(c.RedisReads/r.Seconds), num(c.RedisWrites/r.Seconds), num(c.RedisChangeOps/r.Seconds), num(z.Calls*k.LimiterOpsPerCall), num(z.RedisTrips))
	}
}

// num prints a count with thousands separators (k, M past a million).
func num(x float64) string {
	switch {
	case x >= 1e7:
		return fmt.Sprintf("%.1fM", x/1e6)
	case x >= 1e4:
		return fmt.Sprintf("%.0fk", x/1e3)
	case x >= 100:
		return fmt.Sprintf("%.0f", x)
	default:
		return fmt.Sprintf("%.3g", x)
	}
}

func bytes(x float64) string {
	switch {
	case x >= 1<<30:
		return fmt.Sprintf("%.1f GiB", x/(1<<30))
	case x >= 1<<20:
		return fmt.Sprintf("%.0f MiB", x/(1<<20))
	default:
		return fmt.Sprintf("%.0f KiB", x/(1<<10))
	}
}
