package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// go-redis redials a failed pool in a goroutine that notices Close within
// a second (it sleeps between attempts); it is the library's, bounded, and
// not a leak of ours.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"))
}

type rig struct {
	sim   *imsim.Server
	p     *proxy.Proxy
	url   string
	stop  func() error
	httpc *http.Client
}

// start runs an emulator and a proxy in front of it on loopback ports.
func start(t *testing.T, simCfg imsim.Config, cfg proxy.Config) *rig {
	t.Helper()
	sim, srv := simtest.Start(t, simCfg)
	return startProxy(t, sim, srv.URL, cfg)
}

// startProxy runs a proxy in front of an emulator that already runs.
func startProxy(t *testing.T, sim *imsim.Server, simURL string, cfg proxy.Config) *rig {
	t.Helper()
	srv := struct{ URL string }{simURL}
	cfg.Listen, cfg.AdminListen = "127.0.0.1:0", "127.0.0.1:0"
	cfg.Upstream, cfg.SDKAppID, cfg.AdminIdentifier, cfg.SecretKey = srv.URL, sim.SDKAppID(), sim.Identifier(), sim.Key()
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	p, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	sig := usersig.Sign(sim.Key(), sim.SDKAppID(), sim.Identifier(), time.Now(), time.Hour)
	q := url.Values{"sdkappid": {fmt.Sprint(sim.SDKAppID())}, "identifier": {sim.Identifier()}, "usersig": {sig}, "random": {"1"}, "contenttype": {"json"}}
	tr := &http.Transport{MaxIdleConnsPerHost: 512}
	r := &rig{sim: sim, p: p, url: "http://" + p.Addr() + im.PathGet + "?" + q.Encode(), httpc: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
	var once sync.Once
	var stopErr error
	r.stop = func() error {
		once.Do(func() {
			cancel()
			stopErr = <-done
			tr.CloseIdleConnections()
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := r.stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return r
}

func (r *rig) get(t *testing.T, accounts []string, tags ...string) im.GetResponse {
	t.Helper()
	out, err := r.try(context.Background(), accounts, tags...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (r *rig) try(ctx context.Context, accounts []string, tags ...string) (im.GetResponse, error) {
	body, _ := json.Marshal(im.GetRequest{ToAccount: accounts, TagList: tags})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, r.url, bytes.NewReader(body))
	resp, err := r.httpc.Do(req)
	if err != nil {
		return im.GetResponse{}, err
	}
	defer resp.Body.Close()
	var out im.GetResponse
	if resp.StatusCode != 200 {
		return out, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return out, json.NewDecoder(resp.Body).Decode(&out)
}

// checkItem asserts an item holds exactly account's seeded values for tags.
func checkItem(t *testing.T, it im.UserProfile, account string, tags ...string) {
	t.Helper()
	if it.ToAccount != account || it.ResultCode != 0 {
		t.Fatalf("item %+v, want account %s", it, account)
	}
	var want []im.ProfileItem
	for _, tag := range tags {
		if v, ok := imsim.SeededValue(account, tag); ok {
			want = append(want, im.ProfileItem{Tag: tag, Value: v})
		}
	}
	if len(it.ProfileItem) != len(want) {
		t.Fatalf("%s: items %+v, want %+v", account, it.ProfileItem, want)
	}
	for i := range want {
		if it.ProfileItem[i].Tag != want[i].Tag || !bytes.Equal(it.ProfileItem[i].Value, want[i].Value) {
			t.Fatalf("%s: item %d = %s %s, want %s %s", account, i, it.ProfileItem[i].Tag, it.ProfileItem[i].Value, want[i].Tag, want[i].Value)
		}
	}
}

func accounts(from, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = imsim.AccountName(from + i)
	}
	return out
}

func TestManyAccountsInOneRequest(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	accs := accounts(0, 250)
	out := r.get(t, accs, "Tag_Profile_IM_Nick", "Tag_Profile_IM_Level")
	if out.ErrorCode != 0 || len(out.UserProfileItem) != 250 {
		t.Fatalf("code %d, %d items", out.ErrorCode, len(out.UserProfileItem))
	}
	for i, it := range out.UserProfileItem {
		checkItem(t, it, accs[i], "Tag_Profile_IM_Nick", "Tag_Profile_IM_Level")
	}
	st := r.sim.Stats()
	if st.MaxAccounts > 100 || st.Served < 3 || st.Served > 6 || st.Accounts != 250 {
		t.Fatalf("emulator saw %+v; want 3 to 6 calls of at most 100 (the window may close before all 250 are queued)", st)
	}
}

func TestTagSubsetsServedFromCache(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{DefaultTags: []string{"Tag_Profile_IM_Gender"}})
	accs := accounts(10, 20)
	all := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_SelfSignature", "Tag_Profile_Custom_Test"}
	out := r.get(t, accs, all...)
	for i, it := range out.UserProfileItem {
		checkItem(t, it, accs[i], all...)
	}
	calls := r.sim.Stats().Calls
	// Subsets in another order, and a default tag never asked for: no call.
	out = r.get(t, accs, "Tag_Profile_Custom_Test", "Tag_Profile_IM_Nick")
	for i, it := range out.UserProfileItem {
		checkItem(t, it, accs[i], "Tag_Profile_Custom_Test", "Tag_Profile_IM_Nick")
	}
	out = r.get(t, accs[:1], "Tag_Profile_IM_Gender")
	checkItem(t, out.UserProfileItem[0], accs[0], "Tag_Profile_IM_Gender")
	if got := r.sim.Stats().Calls; got != calls {
		t.Fatalf("subsets made %d more upstream calls", got-calls)
	}
	// A tag not fetched yet goes upstream.
	r.get(t, accs[:1], "Tag_Profile_IM_Level")
	if got := r.sim.Stats().Calls; got != calls+1 {
		t.Fatalf("new tag: %d calls, want 1", got-calls)
	}
}

func TestPerItemErrors(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{})
	out := r.get(t, []string{"user1", "ghost", "user2"}, "Tag_Profile_IM_Nick")
	if out.ErrorCode != 0 || !slices.Equal(out.FailAccount, []string{"ghost"}) || out.UserProfileItem[1].ResultCode != 40003 {
		t.Fatalf("answer %+v", out)
	}
	checkItem(t, out.UserProfileItem[0], "user1", "Tag_Profile_IM_Nick")
	checkItem(t, out.UserProfileItem[2], "user2", "Tag_Profile_IM_Nick")
	// The negative entry is cached.
	calls := r.sim.Stats().Calls
	r.get(t, []string{"ghost"}, "Tag_Profile_IM_Nick")
	if r.sim.Stats().Calls != calls {
		t.Fatal("no such account was not remembered")
	}
	// A per-item internal error is retried, then reported, not cached.
	r.sim.SetFaults(imsim.Faults{ItemInternal: 1})
	out = r.get(t, []string{"user3", "user1"}, "Tag_Profile_IM_Nick")
	if out.UserProfileItem[0].ResultCode != 40006 || !slices.Equal(out.FailAccount, []string{"user3"}) {
		t.Fatalf("answer %+v", out)
	}
	checkItem(t, out.UserProfileItem[1], "user1", "Tag_Profile_IM_Nick")
	if n := r.sim.FetchCount("user3"); n != 3 {
		t.Fatalf("user3 fetched %d times, want 3 attempts", n)
	}
	r.sim.SetFaults(imsim.Faults{})
	out = r.get(t, []string{"user3"}, "Tag_Profile_IM_Nick")
	checkItem(t, out.UserProfileItem[0], "user3", "Tag_Profile_IM_Nick")
}

func TestWholeCallNotFoundIsolated(t *testing.T) {
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{MissingFailsCall: true}}, proxy.Config{BatchWindow: 20 * time.Millisecond})
	accs := accounts(100, 60)
	accs[23] = "ghost"
	out := r.get(t, accs, "Tag_Profile_IM_Nick")
	for i, it := range out.UserProfileItem {
		if i == 23 {
			if it.ResultCode != 40003 {
				t.Fatalf("ghost item %+v", it)
			}
			continue
		}
		checkItem(t, it, accs[i], "Tag_Profile_IM_Nick")
	}
	if !slices.Equal(out.FailAccount, []string{"ghost"}) {
		t.Fatalf("Fail_Account %v", out.FailAccount)
	}
	if st := r.sim.Stats(); st.Calls > 1+2*6 || st.Throttled != 0 {
		t.Fatalf("isolation cost %+v", st)
	}
}

// TestThrottlingRetried: the emulator's quota is far below the proxy's
// rate (another client eats the app's quota): throttled calls are retried
// and every caller is answered right.
func TestThrottlingRetried(t *testing.T) {
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: 3}}, proxy.Config{BatchMax: 1, RequestTimeout: 20 * time.Second})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			a := imsim.AccountName(500 + i)
			out, err := r.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick")
			if err != nil || out.ErrorCode != 0 {
				t.Errorf("%s: %v %+v", a, err, out)
				return
			}
			checkItem(t, out.UserProfileItem[0], a, "Tag_Profile_IM_Nick")
		})
	}
	wg.Wait()
	st := r.sim.Stats()
	if st.Throttled == 0 || st.MaxAcceptPerSec > 3 || st.Served != 8 {
		t.Fatalf("emulator %+v: want throttling exercised, ≤3 accepted per second, 8 served", st)
	}
	if got := testutil.ToFloat64(r.p.Metrics().UpstreamRetries.WithLabelValues("throttled")); got == 0 {
		t.Fatal("no throttled retry counted")
	}
}

// TestQuotaUnderLoad drives cold load through the proxy from many callers
// and checks the quota at the emulator and every answer.
func TestQuotaUnderLoad(t *testing.T) {
	const quota = 20
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: quota}, Faults: imsim.Faults{Latency: 5 * time.Millisecond, Jitter: 10 * time.Millisecond}},
		proxy.Config{Rate: quota})
	deadline := time.Now().Add(2500 * time.Millisecond)
	var mu sync.Mutex
	next, answered := 1000, 0
	var wg sync.WaitGroup
	for range 200 {
		wg.Go(func() {
			for time.Now().Before(deadline) {
				mu.Lock()
				a := imsim.AccountName(next)
				next++
				mu.Unlock()
				out, err := r.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick", "Tag_Profile_IM_Level")
				if err != nil || out.ErrorCode != 0 {
					t.Errorf("%s: %v %+v", a, err, out)
					return
				}
				checkItem(t, out.UserProfileItem[0], a, "Tag_Profile_IM_Nick", "Tag_Profile_IM_Level")
				mu.Lock()
				answered++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	st := r.sim.Stats()
	if st.MaxCallsPerSec > quota || st.Throttled != 0 {
		t.Fatalf("quota broken: %+v", st)
	}
	if st.AccountsPerCall() < 20 {
		t.Fatalf("only %.1f accounts per call under load", st.AccountsPerCall())
	}
	t.Logf("%d lookups answered, %d calls, %.1f accounts per call, max %d calls in a sliding second",
		answered, st.Calls, st.AccountsPerCall(), st.MaxCallsPerSec)
}

// TestCancellationLeavesOthersServed: a caller giving up does not cancel the
// fetch another caller waits on, and the account is fetched once.
func TestCancellationLeavesOthersServed(t *testing.T) {
	r := start(t, imsim.Config{Faults: imsim.Faults{Latency: 300 * time.Millisecond}}, proxy.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	calls := r.sim.Stats().Calls
	var wg sync.WaitGroup
	wg.Go(func() {
		if _, err := r.try(ctx, []string{"user7"}, "Tag_Profile_IM_Nick"); err == nil {
			t.Error("impatient caller got an answer before its deadline")
		}
	})
	wait.For(t, 5*time.Second, "the impatient caller's fetch to reach the upstream", func() bool { return r.sim.Stats().Calls > calls })
	out := r.get(t, []string{"user7"}, "Tag_Profile_IM_Nick")
	checkItem(t, out.UserProfileItem[0], "user7", "Tag_Profile_IM_Nick")
	wg.Wait()
	if n := r.sim.FetchCount("user7"); n != 1 {
		t.Fatalf("user7 fetched %d times", n)
	}
}

// TestShutdownWithLookupsInFlight stops the proxy while lookups wait on the
// upstream: every one of them is answered right, then Run returns.
func TestShutdownWithLookupsInFlight(t *testing.T) {
	r := start(t, imsim.Config{Faults: imsim.Faults{Latency: 200 * time.Millisecond}}, proxy.Config{})
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			a := imsim.AccountName(3000 + i)
			out, err := r.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick")
			if err != nil || out.ErrorCode != 0 {
				t.Errorf("%s lost in shutdown: %v %+v", a, err, out)
				return
			}
			checkItem(t, out.UserProfileItem[0], a, "Tag_Profile_IM_Nick")
		})
	}
	// Stop once every lookup is inside the proxy, waiting on the upstream
	// (requests still in the kernel's accept queue are the load balancer's
	// business: -shutdown-delay keeps them from coming).
	wait.For(t, 10*time.Second, "the 50 lookups to reach the upstream", func() bool { return r.sim.Stats().Accounts >= 50 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if r.p.Ready() {
		t.Fatal("still ready after shutdown")
	}
}

func TestAdminEndpointsAndMetrics(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{})
	r := startProxy(t, sim, srv.URL, proxy.Config{Redis: rs.spec})
	r.get(t, accounts(0, 150), "Tag_Profile_IM_Nick")
	r.get(t, []string{"user1"}, "Tag_Profile_IM_Nick")
	// Failing calls are counted too, each once: 502s and per-item errors.
	sim.SetFaults(imsim.Faults{Fail502: 0.5, ItemInternal: 0.2})
	for i := range 10 {
		r.try(context.Background(), accounts(1000+20*i, 20), "Tag_Profile_IM_Nick")
	}
	sim.SetFaults(imsim.Faults{})
	admin := "http://" + r.p.AdminAddr()
	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/metrics": 200, "/debug/pprof/": 404} {
		resp, err := http.Get(admin + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s: %d", path, resp.StatusCode)
		}
	}
	resp, _ := http.Get(admin + "/metrics")
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, fam := range []string{"portrait_proxy_requests_total", "portrait_proxy_request_duration_seconds", "portrait_proxy_cache_lookups_total",
		"portrait_proxy_singleflight_shared_total", "portrait_proxy_batch_accounts", "portrait_proxy_batch_wait_seconds",
		"portrait_proxy_limiter_wait_seconds", "portrait_proxy_upstream_calls_total", "portrait_proxy_upstream_call_duration_seconds",
		"portrait_proxy_queue_accounts", "portrait_proxy_lookups_total", "portrait_proxy_upstream_retries_total",
		"portrait_proxy_redis_up", "portrait_proxy_redis_round_trips_total", "portrait_proxy_redis_pool_hits_total",
		"portrait_proxy_redis_pool_total_connections", "portrait_proxy_build_info", "portrait_proxy_quota_calls_per_second",
		"portrait_proxy_limiter_fallback", "portrait_proxy_limiter_rate_factor", "portrait_proxy_shed_lookups_total", "portrait_proxy_cross_replica_fetches_total",
		"go_goroutines", "process_cpu_seconds_total"} {
		if !strings.Contains(string(raw), "\n"+fam) && !strings.Contains(string(raw), "# TYPE "+fam) {
			t.Errorf("/metrics lacks %s", fam)
		}
	}
	calls := 0.0
	for _, k := range []string{"ok", "transport", "http", "throttled", "auth", "not_found", "transient", "rejected"} {
		calls += testutil.ToFloat64(r.p.Metrics().UpstreamCalls.WithLabelValues(k))
	}
	st := r.sim.Stats()
	if float64(st.Calls) != calls || st.Fail502 == 0 {
		t.Fatalf("upstream_calls_total sums to %v, the emulator saw %d calls (%d of them 502)", calls, st.Calls, st.Fail502)
	}
	if got := testutil.ToFloat64(r.p.Metrics().UpstreamCalls.WithLabelValues("http")); got != float64(st.Fail502) {
		t.Fatalf("upstream_calls_total{http} = %v, emulator answered %d 502s", got, st.Fail502)
	}
	if hits := testutil.ToFloat64(r.p.Metrics().CacheLookups.WithLabelValues("local", "hit")); hits != 1 {
		t.Fatalf("local hits %v", hits)
	}
	problems, err := testutil.GatherAndLint(r.p.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "portrait_proxy_") {
			t.Errorf("metric lint: %s: %s", p.Metric, p.Text)
		}
	}
}

func TestDemoCurlExampleWorks(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{Faults: imsim.Faults{Latency: time.Millisecond}})
	p, err := proxy.New(proxy.Config{Upstream: srv.URL, SDKAppID: sim.SDKAppID(), AdminIdentifier: sim.Identifier(), SecretKey: sim.Key(),
		Listen: "127.0.0.1:0", AdminListen: "-", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	// Pull URL and body out of the printed curl line and replay it.
	line := p.CurlExample()
	u := line[strings.Index(line, "'http")+1:]
	u = u[:strings.Index(u, "'")]
	body := line[strings.Index(line, "-d '")+4 : len(line)-1]
	resp, err := http.Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out im.GetResponse
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	checkItem(t, out.UserProfileItem[0], "user1", "Tag_Profile_IM_Nick", "Tag_Profile_IM_Level")
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}
