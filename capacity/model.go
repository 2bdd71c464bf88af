// Package capacity sizes a fleet of proxies for a workload: a simulator
// that replays a synthetic workload through the proxy's own cache rules in
// simulated time (Simulate), and a model that turns its counts and the
// per-replica figures measured by make bench into replicas, memory, Redis
// load and the share of the upstream quota used (Size).
//
// The simulator runs the real policy code: each replica's in-process tier
// is a cache.Local, records are made by cache.Cache.Fetched, changes are
// applied by cache.Cache.Change and Invalidate (through a shared tier that
// carries them to every replica, as the Redis feed does), a record serves a
// lookup as cache.Record.Serves says, and the batcher's parameters are those
// batcher.New fills in. What it models rather than runs is the order of the
// lookup path (in-process tier, Redis tier, singleflight, fetch; as
// cache.Cache.Get), the timing of a fetch (one batch window plus a call's
// hold) and how fetches group into calls (Calls).
//
// Cost: lookups of an account whose record is fresh on a replica are
// counted in bulk up to the record's fresh deadline (they are all hits and
// change nothing but the LRU clock, which is set to the deadline), so a hot
// account costs a few steps per TTL, not one per lookup; and beyond the
// Exact most popular accounts the audience is sampled (see SimConfig). A
// 1M-lookups/s, 100M-account workload takes seconds.
//
// Nothing here is safe for concurrent use; Simulate itself may run
// concurrently with other Simulate calls.
package capacity

import (
	"math"
	"time"
)

// Constants are the per-replica figures the model stands on, measured by
// make bench on the reference machine (docs/benchmarks.md, docs/capacity.md
// says which run).
type Constants struct {
	// Proxy CPU per lookup, the whole request (HTTP, JSON, caller auth).
	CPULocalHit time.Duration // served by the in-process tier
	CPURedisHit time.Duration // served by the Redis tier
	CPUCold     time.Duration // fetched upstream (batching, the call's share, write-backs)
	// CPUForward is per forwarded (non-portrait) call. The workload has no
	// forwarded-call rate yet: add forwarded/s × CPUForward to the cores.
	CPUForward time.Duration
	// Memory.
	HeapPerAccount  float64 // bytes of Go heap per account in the in-process tier, one tag
	HeapPerTag      float64 // bytes per further tag
	RedisPerAccount float64 // bytes of Redis used_memory per account hash, one tag (keyspace overhead included)
	RedisPerTag     float64 // bytes per further tag
	// RedisTripsPerRead is pipelines per request that reads the Redis
	// tier, under load (reads share pipelines).
	RedisTripsPerRead float64
	// LimiterOpsPerCall is Redis commands per upstream call for the shared
	// limiter (acquire, end).
	LimiterOpsPerCall float64
	// CoreBudget is the share of a core a replica is planned to use.
	CoreBudget float64
}

// Measured are the constants of docs/benchmarks.md (make bench of
// 2026-12-01 18:16 UTC) and of BenchmarkFootprint (docs/capacity.md).
var Measured = Constants{
	CPULocalHit:       12 * time.Microsecond,  // hot, in-process tier hits (a pinned core)
	CPURedisHit:       24 * time.Microsecond,  // hot, Redis tier hits
	CPUCold:           82 * time.Microsecond,  // replicas: 3 on one Redis (1 replica: 59)
	CPUForward:        139 * time.Microsecond, // forwarded sendmsg, kept-alive connections
	HeapPerAccount:    284,
	HeapPerTag:        141,
	RedisPerAccount:   217,
	RedisPerTag:       49,
	RedisTripsPerRead: 0.08,
	LimiterOpsPerCall: 2,
	CoreBudget:        0.6,
}

// Size is a fleet sized for a simulated workload.
type Size struct {
	Lookups                  float64 // per second
	LocalHit, RedisHit, Miss float64 // shares of lookups (stale and "not found" answers count as hits)
	Fetches                  float64 // accounts fetched per second (misses and background refreshes)
	Calls                    float64 // upstream calls per second
	AccountsPerCall          float64
	QuotaUse                 float64 // Calls / quota
	Shed                     float64 // missed lookups per second answered at once (60007): the quota could not serve them in time
	ShedShare                float64 // Shed / Lookups
	Dropped                  float64 // background refreshes per second given up (the value is served stale meanwhile)
	// FetchCapacity is the most accounts a second the quota carries:
	// quota/(1 s + hold) full calls.
	FetchCapacity float64
	Cores         float64
	Replicas      int
	LocalHeld     float64 // accounts in one replica's in-process tier at the end
	LocalHeap     float64 // bytes of heap for them
	LocalHeapFull float64 // bytes when the tier is full (LocalAccounts)
	RedisAccounts float64 // accounts held in Redis in the steady state
	RedisBytes    float64
	RedisOps      float64 // commands per second
	RedisTrips    float64 // round trips per second
}

// Sized applies the model to a simulation's counts:
//
//	cores    = (H_L·c_L + H_R·c_R + M·c_M + F_bg·(c_M − c_L) + forwarded·c_F) / budget
//	replicas = ⌈cores⌉
//	heap     = accounts·(h_1 + (tags−1)·h_t)           per replica
//	redis    = accounts_live·(r_1 + (tags−1)·r_t)
//	ops      = reads + writes + 2·changes + calls·ops_limiter
//	quota    = calls/s ≤ rate;  fetches/s ≤ 100·rate/(1 s + hold)
//
// with H_L, H_R, M the lookups per second served by the in-process tier,
// the Redis tier and the upstream, and F_bg the background refreshes.
func Sized(r *Result, k Constants) Size {
	c, w := r.Counts, r.Workload
	sec := r.Seconds
	z := Size{Lookups: c.Lookups / sec}
	if c.Lookups > 0 {
		z.LocalHit = (c.LocalFresh + c.LocalStale + c.LocalNeg) / c.Lookups
		z.RedisHit = (c.RedisFresh + c.RedisStale + c.RedisNeg) / c.Lookups
		z.Miss = c.RedisMiss / c.Lookups
	}
	z.Fetches = (c.Fetches + c.Refreshes) / sec
	z.Calls = c.Calls / sec
	if c.Calls > 0 {
		z.AccountsPerCall = c.CallAccounts / c.Calls
	}
	z.QuotaUse = z.Calls / w.Quota
	z.Shed, z.Dropped = c.Shed/sec, c.DroppedRefreshes/sec
	if c.Lookups > 0 {
		z.ShedShare = c.Shed / c.Lookups
	}
	z.FetchCapacity = float64(r.Batcher.MaxAccounts) * w.Quota / (1 + w.Hold.Seconds())
	us := (c.LocalFresh+c.LocalStale+c.LocalNeg)*k.CPULocalHit.Seconds() + (c.RedisFresh+c.RedisStale+c.RedisNeg)*k.CPURedisHit.Seconds() +
		c.RedisMiss*k.CPUCold.Seconds() + c.Refreshes*max(0, (k.CPUCold-k.CPULocalHit).Seconds())
	z.Cores = us / sec / k.CoreBudget
	z.Replicas = max(1, int(math.Ceil(z.Cores-1e-9)))
	n := float64(w.Replicas)
	// the sample's tier is scaled (SHARDS), so what it holds, weighted, can
	// pass the tier's size a little: never more than the tier holds
	z.LocalHeld = c.LocalHeld / n
	if w.LocalAccounts > 0 {
		z.LocalHeld = min(z.LocalHeld, float64(w.LocalAccounts))
	}
	if c.LocalHeld > 0 {
		z.LocalHeap = bytesFor(z.LocalHeld, z.LocalHeld*c.LocalTagsHeld/c.LocalHeld, k.HeapPerAccount, k.HeapPerTag)
		z.LocalHeapFull = bytesFor(float64(w.LocalAccounts), float64(w.LocalAccounts)*c.LocalTagsHeld/c.LocalHeld, k.HeapPerAccount, k.HeapPerTag)
	}
	if w.Redis {
		z.RedisAccounts = c.RedisSteadyAcc
		tags := float64(len(unionOf(w)))
		if c.RedisLive > 0 {
			tags = c.RedisTagsLive / c.RedisLive
		}
		z.RedisBytes = bytesFor(z.RedisAccounts, z.RedisAccounts*tags, k.RedisPerAccount, k.RedisPerTag)
		z.RedisOps = (c.RedisReads+c.RedisWrites+c.RedisChangeOps)/sec + z.Calls*k.LimiterOpsPerCall
		// write-backs: one pipeline per call's answers
		z.RedisTrips = c.RedisReads/sec*k.RedisTripsPerRead + z.Calls + c.Changes/sec + z.Calls*k.LimiterOpsPerCall
	}
	return z
}

// bytesFor is the memory of accounts holding tags tags in all.
func bytesFor(accounts, tags, perAccount, perTag float64) float64 {
	return accounts*perAccount + max(0, tags-accounts)*perTag
}

func unionOf(w Workload) []string {
	var u []string
	seen := map[string]bool{}
	for _, t := range w.DefaultTags {
		if !seen[t] {
			seen[t] = true
			u = append(u, t)
		}
	}
	for _, ts := range w.Tags {
		for _, t := range ts.Tags {
			if !seen[t] {
				seen[t] = true
				u = append(u, t)
			}
		}
	}
	return u
}
