package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// crowd runs n good callers at once, each looking up its own cold account
// (from first on) for Nick, next to offender (run in a loop until the crowd
// is done), and returns the good callers' failures.
func crowd(t *testing.T, r *rig, first, n int, offender func()) []string {
	t.Helper()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
		done     atomic.Bool
		start    = make(chan struct{})
	)
	offDone := make(chan struct{})
	go func() {
		defer close(offDone)
		<-start
		for !done.Load() {
			offender()
		}
	}()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			a := imsim.AccountName(first + i)
			out, err := r.try(context.Background(), []string{a}, "Tag_Profile_IM_Nick")
			switch {
			case err != nil:
				mu.Lock()
				failures = append(failures, a+": "+err.Error())
				mu.Unlock()
			case out.ErrorCode != 0 || len(out.UserProfileItem) != 1 || out.UserProfileItem[0].ResultCode != 0 ||
				len(out.UserProfileItem[0].ProfileItem) != 1:
				mu.Lock()
				failures = append(failures, fmt.Sprintf("%s: %d %s %+v", a, out.ErrorCode, out.ErrorInfo, out.UserProfileItem))
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	done.Store(true)
	<-offDone
	return failures
}

func isolationCalls(r *rig, cause string) float64 {
	return testutil.ToFloat64(r.p.Metrics().IsolationCalls.WithLabelValues(cause))
}

// TestPoisonedTagCallerIsolated: 200 good callers next to one asking for a
// custom tag the app never configured. No good caller fails; the offender
// gets 40009 naming its tag; the upstream refused one call and isolation
// cost at most two more; the tag is learned, so neither this replica nor
// another on the same Redis spends a call on it again.
func TestPoisonedTagCallerIsolated(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: -1}})
	cfg := proxy.Config{Redis: rs.spec, BatchWindow: 5 * time.Millisecond}
	a := startProxy(t, sim, srv.URL, cfg)
	b := startProxy(t, sim, srv.URL, cfg)
	var offended []im.GetResponse
	failures := crowd(t, a, 1000, 200, func() {
		out, err := a.try(context.Background(), []string{"user5"}, "Tag_Profile_IM_Nick", "Tag_Profile_Custom_Nope")
		if err != nil {
			t.Error(err)
			return
		}
		offended = append(offended, out)
	})
	if len(failures) != 0 {
		t.Fatalf("%d good callers failed next to a poisoned tag, e.g. %s", len(failures), failures[0])
	}
	if len(offended) == 0 {
		t.Fatal("the offender never got an answer")
	}
	for _, out := range offended {
		if out.ErrorCode != im.CodeTagNotExist || !strings.Contains(out.ErrorInfo, "Tag_Profile_Custom_Nope") {
			t.Fatalf("offender got %d %q", out.ErrorCode, out.ErrorInfo)
		}
	}
	st := sim.Stats()
	// The shared call refused, then (when others shared it) the offender's
	// own part: once learned, the tag costs no call.
	if st.Rejected < 1 || st.Rejected > 2 {
		t.Fatalf("the upstream refused %d calls for %d offender requests; a learned tag must cost none", st.Rejected, len(offended))
	}
	if n := isolationCalls(a, metrics.IsolateTag); n > 2 {
		t.Fatalf("isolation cost %v calls", n)
	}
	t.Logf("upstream calls %d (refused %d), isolation calls %v, offender answers %d", st.Calls, st.Rejected, isolationCalls(a, metrics.IsolateTag), len(offended))
	// The other replica learned it through Redis: no call for it there either.
	wait.For(t, 5*time.Second, "replica B to learn the refused tag", func() bool { return testutil.ToFloat64(b.p.Metrics().LearnedTags) >= 1 })
	calls := sim.Stats().Calls
	for _, r := range []*rig{a, b} {
		out := r.get(t, []string{"user6"}, "Tag_Profile_Custom_Nope", "Tag_Profile_IM_Nick")
		if out.ErrorCode != im.CodeTagNotExist || !strings.Contains(out.ErrorInfo, "Tag_Profile_Custom_Nope") {
			t.Fatalf("learned tag answered %d %q", out.ErrorCode, out.ErrorInfo)
		}
	}
	if got := sim.Stats().Calls; got != calls {
		t.Fatalf("a learned tag cost %d upstream calls", got-calls)
	}
}

// TestRejectedAccountCallerIsolated: 200 good callers next to one naming
// an account id the upstream refuses the whole call for (40001). No good
// caller fails; the offender gets 40001 naming its account; isolation
// costs calls logarithmic in the batch, once.
func TestRejectedAccountCallerIsolated(t *testing.T) {
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: -1, RejectAccounts: []string{"bad.id"}}},
		proxy.Config{BatchWindow: 5 * time.Millisecond})
	var offended []im.GetResponse
	failures := crowd(t, r, 2000, 200, func() {
		out, err := r.try(context.Background(), []string{"bad.id"}, "Tag_Profile_IM_Nick")
		if err != nil {
			t.Error(err)
			return
		}
		offended = append(offended, out)
	})
	if len(failures) != 0 {
		t.Fatalf("%d good callers failed next to a rejected account, e.g. %s", len(failures), failures[0])
	}
	for _, out := range offended {
		if out.ErrorCode != im.CodeBadRequest || !strings.Contains(out.ErrorInfo, "bad.id") {
			t.Fatalf("offender got %d %q", out.ErrorCode, out.ErrorInfo)
		}
	}
	// One isolation, at most 2·⌈log2 100⌉ calls (after one account alone,
	// then the others: 40001 may be the tags'); then the account is
	// remembered (-negative-ttl) and the offender's repeats cost nothing.
	st := sim(r).Stats()
	if st.Rejected > 1+1+7 {
		t.Fatalf("%d refused calls: a rejected account must be isolated once", st.Rejected)
	}
	t.Logf("upstream calls %d (refused %d), isolation calls %v, offender answers %d", st.Calls, st.Rejected, isolationCalls(r, metrics.IsolateAccount), len(offended))
	if n := isolationCalls(r, metrics.IsolateAccount); n > float64(st.Rejected)*14 || len(offended) == 0 {
		t.Fatalf("%v isolation calls for %d refused calls, %d offender answers", n, st.Rejected, len(offended))
	}
}

func sim(r *rig) *imsim.Server { return r.sim }

// TestNoCustomDataLeavesStandardServed: an account without custom data is
// asked for a custom tag by one caller while others ask it for Nick (and
// the proxy fetches a custom default tag with every call): the Nick callers
// are served, the custom caller gets 40809, and Nick stays cached.
func TestNoCustomDataLeavesStandardServed(t *testing.T) {
	rs := singleRedis(t)
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: -1, NoCustomData: []string{"user7"}}},
		proxy.Config{Redis: rs.spec, BatchWindow: 5 * time.Millisecond, DefaultTags: []string{"Tag_Profile_Custom_Team"}})
	var wg sync.WaitGroup
	errs := make(chan string, 100)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tags := []string{"Tag_Profile_IM_Nick"}
			if i%10 == 0 {
				tags = []string{"Tag_Profile_Custom_Test"}
			}
			out, err := r.try(context.Background(), []string{"user7"}, tags...)
			switch {
			case err != nil:
				errs <- err.Error()
			case i%10 == 0 && (out.ErrorCode != im.CodeNoCustomData && (len(out.UserProfileItem) != 1 || out.UserProfileItem[0].ResultCode != im.CodeNoCustomData)):
				errs <- fmt.Sprintf("custom caller: %+v", out)
			case i%10 != 0 && (out.ErrorCode != 0 || out.UserProfileItem[0].ResultCode != 0 || len(out.UserProfileItem[0].ProfileItem) != 1):
				errs <- fmt.Sprintf("Nick caller: %d %q %+v", out.ErrorCode, out.ErrorInfo, out.UserProfileItem)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	calls := r.sim.Stats().Calls
	checkItem(t, r.get(t, []string{"user7"}, "Tag_Profile_IM_Nick").UserProfileItem[0], "user7", "Tag_Profile_IM_Nick")
	if out := r.get(t, []string{"user7"}, "Tag_Profile_Custom_Test"); out.ErrorCode != im.CodeNoCustomData &&
		out.UserProfileItem[0].ResultCode != im.CodeNoCustomData {
		t.Fatalf("custom tag of user7: %+v", out)
	}
	if got := r.sim.Stats().Calls; got != calls {
		t.Fatalf("cached answers cost %d calls", got-calls)
	}
}

// TestAttackTagListAndAccounts: a TagList repeating one tag 40,000 times
// is refused (40001) without a call; one repeating it up to the limit is
// answered once per account (the answer does not grow with the repeats);
// repeated and odd account ids are answered once per mention.
func TestAttackTagListAndAccounts(t *testing.T) {
	r := start(t, imsim.Config{Behaviour: imsim.Behaviour{Quota: -1}}, proxy.Config{})
	post := func(body string) (im.GetResponse, int) {
		t.Helper()
		resp, err := r.httpc.Post(r.url, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		raw, _ := io.ReadAll(resp.Body)
		var out im.GetResponse
		if err := json.Unmarshal(raw, &out); err != nil {
			t.Fatalf("answer %q: %v", raw, err)
		}
		return out, len(raw)
	}
	rep := func(tag string, n int) string { return `"` + strings.Repeat(tag+`","`, n-1) + tag + `"` }
	accs := `"user1","user2","user3","user4","user5","user6","user7","user8","user9","user10","user11","user12","user13","user14","user15","user16","user17","user18","user19","user20"`
	out, _ := post(`{"To_Account":[` + accs + `],"TagList":[` + rep("Tag_Profile_IM_Nick", 40_000) + `]}`)
	if out.ErrorCode != im.CodeBadRequest || r.sim.Stats().Calls != 0 {
		t.Fatalf("40,000 tags: %d %q, %d upstream calls", out.ErrorCode, out.ErrorInfo, r.sim.Stats().Calls)
	}
	out, size := post(`{"To_Account":[` + accs + `],"TagList":[` + rep("Tag_Profile_IM_Nick", im.MaxTagsPerCall) + `]}`)
	if out.ErrorCode != 0 || len(out.UserProfileItem) != 20 || size > 4096 {
		t.Fatalf("repeated tags: code %d, %d items, %d bytes", out.ErrorCode, len(out.UserProfileItem), size)
	}
	for _, it := range out.UserProfileItem {
		checkItem(t, it, it.ToAccount, "Tag_Profile_IM_Nick")
	}
	odd := []string{"user1", "user1", "a:b", "{x}", "~", "user1", strings.Repeat("z", 32), "pp:v2:1:x"}
	body := new(bytes.Buffer)
	fmt.Fprintf(body, `{"To_Account":[`)
	for i, a := range odd {
		if i > 0 {
			body.WriteString(",")
		}
		fmt.Fprintf(body, "%q", a)
	}
	body.WriteString(`],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Nick"]}`)
	out, _ = post(body.String())
	if out.ErrorCode != 0 || len(out.UserProfileItem) != len(odd) {
		t.Fatalf("odd accounts: %+v", out)
	}
	for i, it := range out.UserProfileItem {
		if it.ToAccount != odd[i] {
			t.Fatalf("item %d is %q, want %q", i, it.ToAccount, odd[i])
		}
		if odd[i] == "user1" {
			checkItem(t, it, "user1", "Tag_Profile_IM_Nick")
		} else if it.ResultCode != im.CodeAccountNotFound {
			t.Fatalf("odd account %q: %+v", odd[i], it)
		}
	}
}
