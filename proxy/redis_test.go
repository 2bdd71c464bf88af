package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// redisSetup is a Redis deployment for a test: one server or a cluster.
type redisSetup struct {
	spec   string
	dbsize func() int
	kill   func()
	revive func()
}

func singleRedis(t *testing.T) redisSetup {
	srv := redistest.Start(t)
	return redisSetup{spec: srv.URL(),
		dbsize: func() int { n, _ := srv.Do("DBSIZE"); v, _ := strconv.Atoi(n); return v },
		kill:   srv.Kill, revive: srv.Restart}
}

func clusterRedis(t *testing.T) redisSetup {
	c := redistest.StartCluster(t, 3)
	return redisSetup{spec: c.Addrs(), dbsize: func() int {
		total := 0
		for _, s := range c.Servers {
			n, _ := s.Do("DBSIZE")
			v, _ := strconv.Atoi(n)
			total += v
		}
		return total
	}}
}

func waitDBSize(t *testing.T, rs redisSetup, n int) {
	t.Helper()
	wait.For(t, 10*time.Second, fmt.Sprintf("Redis to hold %d keys", n), func() bool { return rs.dbsize() >= n })
}

func redisHits(r *rig) float64 {
	return testutil.ToFloat64(r.p.Metrics().CacheLookups.WithLabelValues("redis", "hit"))
}

// TestFreshReplicaServesWarmedAccounts: replica A warms accounts; a new
// replica B (empty in-process tier) serves them from Redis with no upstream
// call. On one server and on a 3-master cluster.
func TestFreshReplicaServesWarmedAccounts(t *testing.T) {
	for name, setup := range map[string]func(*testing.T) redisSetup{"single": singleRedis, "cluster": clusterRedis} {
		t.Run(name, func(t *testing.T) {
			rs := setup(t)
			sim, srv := simtest.Start(t, imsim.Config{})
			a := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
			accs := accounts(0, 200)
			tags := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_IM_SelfSignature"}
			a.get(t, accs, tags...)
			waitDBSize(t, rs, 200)
			calls := sim.Stats().Calls
			b := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
			for i := 0; i < 200; i += 50 {
				out := b.get(t, accs[i:i+50], tags[1], tags[0]) // a subset, reordered
				for k, it := range out.UserProfileItem {
					checkItem(t, it, accs[i+k], tags[1], tags[0])
				}
			}
			if got := sim.Stats().Calls; got != calls {
				t.Fatalf("fresh replica made %d upstream calls", got-calls)
			}
			if hits := redisHits(b); hits != 200 {
				t.Fatalf("redis hits %v, want 200", hits)
			}
			// One Redis round trip per request: 4 requests, 4 read pipelines
			// (write-backs are none: nothing was fetched).
			if trips := testutil.ToFloat64(b.p.Metrics().RedisRoundTrips); trips != 4 {
				t.Fatalf("%v Redis round trips for 4 requests", trips)
			}
		})
	}
}

// TestStaleFromRedis: past fresh, a fresh replica serves the old value at
// once and refreshes in the background; when the upstream fails, the stale
// value keeps being served.
func TestStaleFromRedis(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{})
	cfg := proxy.Config{Redis: rs.spec, TTL: 200 * time.Millisecond, StaleTTL: time.Hour}
	a := startProxy(t, sim, srv.URL, cfg)
	accs := accounts(40, 30)
	a.get(t, accs, "Tag_Profile_IM_Nick")
	waitDBSize(t, rs, 30)
	sim.Put("user40", "Tag_Profile_IM_Nick", json.RawMessage(`"renamed"`))
	time.Sleep(250 * time.Millisecond) // past the 200 ms TTL on the wall clock the proxy keeps

	b := startProxy(t, sim, srv.URL, cfg)
	out := b.get(t, []string{"user40"}, "Tag_Profile_IM_Nick")
	if v := string(out.UserProfileItem[0].ProfileItem[0].Value); v != `"nick-user40"` {
		t.Fatalf("stale serve = %s, want the old value at once", v)
	}
	wait.For(t, 5*time.Second, "the background refresh to land", func() bool {
		out = b.get(t, []string{"user40"}, "Tag_Profile_IM_Nick")
		return string(out.UserProfileItem[0].ProfileItem[0].Value) == `"renamed"`
	})

	// The upstream now fails every call: a third fresh replica still
	// serves every account (stale), with no error.
	sim.SetFaults(imsim.Faults{Fail502: 1})
	c := startProxy(t, sim, srv.URL, cfg)
	out = c.get(t, accs[1:], "Tag_Profile_IM_Nick")
	if out.ErrorCode != 0 || len(out.FailAccount) != 0 {
		t.Fatalf("stale not served while the upstream fails: %+v", out)
	}
	for i, it := range out.UserProfileItem {
		checkItem(t, it, accs[1+i], "Tag_Profile_IM_Nick")
	}
	if st := testutil.ToFloat64(c.p.Metrics().CacheLookups.WithLabelValues("redis", "stale")); st != float64(len(accs)-1) {
		t.Fatalf("stale serves counted %v", st)
	}
}

func TestNegativeEntryShared(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{})
	a := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	out := a.get(t, []string{"ghost"}, "Tag_Profile_IM_Nick")
	if out.UserProfileItem[0].ResultCode != 40003 {
		t.Fatalf("%+v", out)
	}
	waitDBSize(t, rs, 1)
	calls := sim.Stats().Calls
	b := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	out = b.get(t, []string{"ghost"}, "Tag_Profile_IM_Nick")
	if out.UserProfileItem[0].ResultCode != 40003 || sim.Stats().Calls != calls {
		t.Fatalf("negative entry not shared: %+v, %d calls", out, sim.Stats().Calls-calls)
	}
}

// TestPerAppIsolation: two apps on one Redis never see each other's entries.
func TestPerAppIsolation(t *testing.T) {
	rs := singleRedis(t)
	sim1, srv1 := simtest.Start(t, imsim.Config{SDKAppID: 1400000001})
	sim2, srv2 := simtest.Start(t, imsim.Config{SDKAppID: 1400000002})
	sim2.Put("user1", "Tag_Profile_IM_Nick", json.RawMessage(`"app2-nick"`))
	a := startProxy(t, sim1, srv1.URL, proxy.Config{Redis: rs.spec})
	b := startProxy(t, sim2, srv2.URL, proxy.Config{Redis: rs.spec})
	a.get(t, []string{"user1"}, "Tag_Profile_IM_Nick")
	waitDBSize(t, rs, 1)
	out := b.get(t, []string{"user1"}, "Tag_Profile_IM_Nick")
	if v := string(out.UserProfileItem[0].ProfileItem[0].Value); v != `"app2-nick"` || sim2.FetchCount("user1") != 1 {
		t.Fatalf("app 2 got %s (fetched %d): entries leak across apps", v, sim2.FetchCount("user1"))
	}
}

// TestHostileAccountIDs: ids full of key syntax round-trip through Redis,
// on one server and on a cluster.
func TestHostileAccountIDs(t *testing.T) {
	ids := []string{"a:b", "{slot}", "x}{y", "*", "?[]", "with space", `quo"te`, `back\slash`, "pp:v2:1400000000:user1", "~dXNlcjE", "<&>"}
	for name, setup := range map[string]func(*testing.T) redisSetup{"single": singleRedis, "cluster": clusterRedis} {
		t.Run(name, func(t *testing.T) {
			rs := setup(t)
			sim, srv := simtest.Start(t, imsim.Config{})
			for _, id := range ids {
				b, _ := json.Marshal("nick of " + id)
				sim.Put(id, "Tag_Profile_IM_Nick", b)
			}
			a := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
			a.get(t, ids, "Tag_Profile_IM_Nick")
			waitDBSize(t, rs, len(ids))
			calls := sim.Stats().Calls
			b := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
			out := b.get(t, ids, "Tag_Profile_IM_Nick")
			for i, it := range out.UserProfileItem {
				want, _ := json.Marshal("nick of " + ids[i])
				if it.ToAccount != ids[i] || len(it.ProfileItem) != 1 || string(it.ProfileItem[0].Value) != string(want) {
					t.Fatalf("%q: %+v", ids[i], it)
				}
			}
			if sim.Stats().Calls != calls {
				t.Fatal("hostile ids were not served from Redis")
			}
		})
	}
}

// TestRedisKilledMidLoad: Redis dies under load and comes back: no lookup
// fails, none is wrong, and Redis is used again afterwards.
func TestRedisKilledMidLoad(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{Faults: imsim.Faults{Latency: 2 * time.Millisecond}})
	a := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	warm := accounts(0, 300)
	a.get(t, warm[:100], "Tag_Profile_IM_Nick")
	a.get(t, warm[100:200], "Tag_Profile_IM_Nick")
	a.get(t, warm[200:], "Tag_Profile_IM_Nick")
	waitDBSize(t, rs, 300)

	b := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	var failed, wrong, done atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var next atomic.Int64
	next.Store(10_000)
	for w := range 20 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				a := warm[(w*37+i)%len(warm)] // warm accounts: from Redis or the local tier
				if i%3 == 0 {
					a = imsim.AccountName(int(next.Add(1))) // cold: through the upstream
				}
				out, err := b.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick")
				if err != nil || out.ErrorCode != 0 || len(out.UserProfileItem) != 1 {
					failed.Add(1)
					continue
				}
				want, _ := imsim.SeededValue(a, "Tag_Profile_IM_Nick")
				if it := out.UserProfileItem[0]; it.ToAccount != a || len(it.ProfileItem) != 1 || string(it.ProfileItem[0].Value) != string(want) {
					wrong.Add(1)
				}
				done.Add(1)
			}
		})
	}
	// progress waits until another n lookups are answered (right or not).
	progress := func(n int64, what string) {
		t.Helper()
		from := done.Load() + failed.Load()
		wait.For(t, 10*time.Second, what, func() bool { return done.Load()+failed.Load() >= from+n })
	}
	progress(200, "200 lookups with Redis up")
	rs.kill()
	// The tier learns of the death from its next read or write; every
	// caller may be waiting in the batcher then (the shared limiter, which
	// saw it first, grants nothing for a window on its fallback).
	wait.For(t, 5*time.Second, "redis_up 0 after Redis died", func() bool { return testutil.ToFloat64(b.p.Metrics().RedisUp) == 0 })
	progress(100, "100 lookups without Redis")
	rs.revive()
	wait.For(t, 5*time.Second, "the proxy to go back to Redis (redis_up 1)", func() bool { return testutil.ToFloat64(b.p.Metrics().RedisUp) == 1 })
	progress(200, "200 lookups with Redis back")
	close(stop)
	wg.Wait()
	if failed.Load() != 0 || wrong.Load() != 0 {
		t.Fatalf("%d failed and %d wrong of %d lookups", failed.Load(), wrong.Load(), done.Load())
	}
	// Redis is used again: a new write-back lands, and a fresh replica reads it.
	keys := rs.dbsize()
	fresh := imsim.AccountName(int(next.Add(1)))
	b.get(t, []string{fresh}, "Tag_Profile_IM_Nick")
	waitDBSize(t, rs, keys+1)
	c := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	calls := sim.Stats().Calls
	out := c.get(t, []string{fresh}, "Tag_Profile_IM_Nick")
	if out.ErrorCode != 0 || redisHits(c) != 1 || sim.Stats().Calls != calls {
		t.Fatalf("restarted Redis not serving: %+v, hits %v", out, redisHits(c))
	}
	if st := sim.Stats(); st.Throttled != 0 {
		t.Fatalf("throttled %d", st.Throttled)
	}
	t.Logf("%d lookups through a Redis outage, none failed or wrong", done.Load())
}
