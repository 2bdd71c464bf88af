package proxy_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// Without -callback-token the receiver is not there unless
// -callback-unsigned asks for it: a forged callback reaches nothing.
func TestCallbackReceiverOffWithoutToken(t *testing.T) {
	sim, srv := simtest.Start(t, imsim.Config{})
	post := func(r *rig) int {
		body := `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"user1","EventTime":` +
			fmt.Sprint(time.Now().UnixMilli()) + `,"ProfileItem":[{"Tag":"Tag_Profile_Custom_Aa","Value":"x"}]}`
		resp, err := http.Post("http://"+r.p.Addr()+"/im/callback?SdkAppid="+fmt.Sprint(sim.SDKAppID())+"&CallbackCommand=Profile.CallbackPortraitSet",
			"application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(startProxy(t, sim, srv.URL, proxy.Config{})); code != http.StatusNotFound {
		t.Fatalf("no token, no -callback-unsigned: the receiver answered HTTP %d", code)
	}
	if code := post(startProxy(t, sim, srv.URL, proxy.Config{CallbackUnsigned: true})); code != http.StatusOK {
		t.Fatalf("-callback-unsigned: HTTP %d", code)
	}
}

// The least Redis ACL the README documents is enough for every part of the
// proxy: the tiers, the feed, claims, both shared limiters.
func TestRedisACLUserDocumented(t *testing.T) {
	srv := redistest.Start(t, "--requirepass", "admin-pw", "--user", "proxy", "on", ">pw", "~pp:*", "~{pp:*", "&pp:*",
		"+@read", "+@write", "+@scripting", "+@pubsub", "+@connection", "+@keyspace", "+time")
	sim, simSrv := simtest.Start(t, imsim.Config{})
	t.Cleanup(sim.Close)
	cfg := proxy.Config{Redis: "redis://proxy@" + srv.Addr() + "/0", RedisPassword: "pw", CrossReplica: true, CallbackToken: "tok"}
	a, b := startProxy(t, sim, simSrv.URL, cfg), startProxy(t, sim, simSrv.URL, cfg)
	checkItem(t, a.get(t, []string{"user3"}, nickTag).UserProfileItem[0], "user3", nickTag)
	checkItem(t, b.get(t, []string{"user3"}, nickTag).UserProfileItem[0], "user3", nickTag) // from Redis
	if e := a.set(t, "user3", nickItem("acl")); e.ErrorCode != 0 {
		t.Fatalf("set: %+v", e)
	}
	waitNick(t, b, "user3", "acl", time.Now())
	for _, r := range []*rig{a, b} {
		m := r.p.Metrics()
		for _, op := range []string{"get", "put", "claim", "release", "probe", "change", "feed"} {
			if n := testutil.ToFloat64(m.RedisErrors.WithLabelValues(op)); n != 0 {
				t.Errorf("redis_errors_total{op=%s} = %v", op, n)
			}
		}
		if testutil.ToFloat64(m.LimiterFallback) != 0 || testutil.ToFloat64(m.RedisUp) != 1 {
			out, _ := exec.Command("redis-cli", "-p", strconv.Itoa(srv.Port), "--no-auth-warning", "-a", "admin-pw", "ACL", "LOG", "3").CombinedOutput()
			t.Errorf("the shared limiter (%v) or the tier (%v) fell back; ACL LOG:\n%s", testutil.ToFloat64(m.LimiterFallback), testutil.ToFloat64(m.RedisUp), out)
		}
	}
	if n, _ := srv.Do("DBSIZE"); n == "0" {
		t.Fatal("nothing written to Redis")
	}
}

// The -auth none warning says what is open: reads always, writes only with
// -auth-none-writes.
func TestAuthNoneWarningSaysWhatIsOpen(t *testing.T) {
	sim, simSrv := simtest.Start(t, imsim.Config{})
	for _, writes := range []bool{false, true} {
		logs := &syncBuffer{}
		p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: simSrv.URL, SDKAppID: sim.SDKAppID(),
			SecretKey: sim.Key(), Auth: "none", AuthNoneWrites: writes, Logger: slog.New(slog.NewTextHandler(logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		p.Run(canceled())
		out := logs.String()
		if !strings.Contains(out, "read every profile") {
			t.Errorf("writes %v: the warning does not say reads are open: %s", writes, out)
		}
		if opened := strings.Contains(out, "change any profile"); opened != writes {
			t.Errorf("writes %v: the warning says writes are open: %v: %s", writes, opened, out)
		}
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}
