package batcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// feed grants tokens on g until the test ends.
func feed(t *testing.T, g *gate) {
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case g.ch <- struct{}{}:
			case <-stop:
				return
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
}

// picky refuses a whole call as the upstream does: 40009 for a custom tag
// not in custom, 60015 for an account in reject.
func picky(custom []string, reject ...string) func(int, im.GetRequest) (*im.GetResponse, error) {
	return func(_ int, r im.GetRequest) (*im.GetResponse, error) {
		for _, t := range r.TagList {
			if !im.IsStandardTag(t) && !slices.Contains(custom, t) {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 40009, Info: "tag does not exist: " + t}
			}
		}
		for _, a := range r.ToAccount {
			if slices.Contains(reject, a) {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 60015, Info: "account type error"}
			}
		}
		return found(r), nil
	}
}

type learner struct {
	mu      sync.Mutex
	learned map[string]int
}

func (l *learner) Learn(tag string, code int, _ string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.learned == nil {
		l.learned = map[string]int{}
	}
	l.learned[tag] = code
}

func (l *learner) Refused(tag string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.learned[tag]
	return ok
}

// TestPoisonedTagIsolated: 99 callers asking for standard tags share a
// batch with one asking for a custom tag that does not exist, and with one
// asking the same account as a good caller. Only the poisoned caller gets
// 40009, naming its tag; the isolation costs two calls after the refused
// one, and the tag is learned.
func TestPoisonedTagIsolated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: picky([]string{"Tag_Profile_Custom_Test"})}
		g := newGate()
		tl := &learner{}
		h := start(t, Config{Upstream: up, Limiter: g, Tags: tl})
		var chans []chan loaded
		for i := range 99 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 99)
		bad := loadAsync(h.b, context.Background(), "u5", "Tag_Profile_IM_Nick", "Tag_Profile_Custom_Nope")
		okCustom := loadAsync(h.b, context.Background(), "u6", "Tag_Profile_Custom_Test")
		h.waitQueued(t, 99) // same accounts: still 99 slots
		h.waitWaiters(t, "u5", 2)
		h.waitWaiters(t, "u6", 2)
		feed(t, g)
		for i, ch := range chans {
			if l := <-ch; l.err != nil || value(l.res, "Tag_Profile_IM_Nick") != fmt.Sprintf("v-u%d-Tag_Profile_IM_Nick", i) {
				t.Fatalf("good caller %d: %+v %v", i, l.res.Item, l.err)
			}
		}
		if l := <-okCustom; l.err != nil || value(l.res, "Tag_Profile_Custom_Test") == "" {
			t.Fatalf("caller of a configured custom tag: %+v %v", l.res.Item, l.err)
		}
		l := <-bad
		var ue *upstream.Error
		if !errors.As(l.err, &ue) || ue.Code != 40009 || !strings.Contains(ue.Info, "Tag_Profile_Custom_Nope") {
			t.Fatalf("poisoned caller: %v", l.err)
		}
		calls := up.Calls()
		// refused whole; standard-only callers | custom callers; then the two
		// custom tag sets apart.
		if len(calls) > 1+2+2 {
			t.Fatalf("isolation took %d calls: %+v", len(calls), calls)
		}
		for _, c := range calls[1:] {
			if slices.Contains(c.TagList, "Tag_Profile_Custom_Nope") && slices.ContainsFunc(c.ToAccount, func(a string) bool { return a != "u5" && a != "u6" }) {
				t.Fatalf("the bad tag rode along with standard-only callers after the refusal: %+v", c)
			}
		}
		if tl.learned["Tag_Profile_Custom_Nope"] != 40009 || len(tl.learned) != 1 {
			t.Fatalf("learned %v", tl.learned)
		}
		if got := testutil.ToFloat64(h.m.IsolationCalls.WithLabelValues(metrics.IsolateTag)); got != float64(len(calls)-1) {
			t.Fatalf("isolation_calls_total{cause=tag} = %v, want %d", got, len(calls)-1)
		}
	})
}

// TestIsolationCostLogarithmic: many distinct tag sets, one of them bad:
// the calls spent grow with log2 of the sets, not with the callers.
func TestIsolationCostLogarithmic(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		letters := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
		var custom []string
		for i := range 32 {
			custom = append(custom, "Tag_Profile_Custom_X"+string(letters[i]))
		}
		up := &fakeUpstream{fn: picky(custom)}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 32 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), custom[i]))
		}
		h.waitQueued(t, 32)
		bad := loadAsync(h.b, context.Background(), "u100", "Tag_Profile_Custom_Nope")
		h.waitQueued(t, 33)
		feed(t, g)
		for i, ch := range chans {
			if l := <-ch; l.err != nil {
				t.Fatalf("good caller %d: %v", i, l.err)
			}
		}
		if l := <-bad; l.err == nil {
			t.Fatal("poisoned caller served")
		}
		// 33 tag sets: ⌈log2 33⌉ = 6 levels of two calls, plus the refused one.
		if n := len(up.Calls()); n > 1+2*6 {
			t.Fatalf("isolation took %d calls for 33 tag sets", n)
		}
	})
}

// TestRejectedAccountIsolated: an account the upstream cannot read refuses
// the whole call (60015): halving isolates it, only its caller gets the
// code, with its account named.
func TestRejectedAccountIsolated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: picky(nil, "odd\x7fid")}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 99 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
		}
		bad := loadAsync(h.b, context.Background(), "odd\x7fid", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 100)
		feed(t, g)
		for i, ch := range chans {
			if l := <-ch; l.err != nil {
				t.Fatalf("good caller %d: %v", i, l.err)
			}
		}
		l := <-bad
		var ue *upstream.Error
		if !errors.As(l.err, &ue) || ue.Code != 60015 || !strings.Contains(ue.Info, `"odd\x7fid"`) {
			t.Fatalf("rejected caller: %v", l.err)
		}
		if n := len(up.Calls()); n > 1+2*7 {
			t.Fatalf("isolation took %d calls", n)
		}
	})
}

// TestBadDefaultTagDropped: a default tag the upstream refuses fails every
// call; one bare retry serves the callers, and once learned the default
// tag is no longer sent.
func TestBadDefaultTagDropped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: picky(nil)}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g, Tags: &learner{}, DefaultTags: []string{"Tag_Profile_Custom_Gone"}})
		feed(t, g)
		for range 2 {
			if r, err := h.b.Load(context.Background(), "u1", []string{"Tag_Profile_IM_Nick"}); err != nil || value(r, "Tag_Profile_IM_Nick") == "" {
				t.Fatalf("%+v %v", r.Item, err)
			}
		}
		calls := up.Calls()
		// refused, bare retry (served), then the learned default tag is left out.
		if len(calls) != 3 || slices.Contains(calls[2].TagList, "Tag_Profile_Custom_Gone") {
			t.Fatalf("calls %+v", calls)
		}
	})
}

// TestNoDataClassConcernsItsCallers: an account without standard data
// answers 40807 to a call asking standard and custom tags; the caller who
// asked only for custom tags is asked again without the standard ones and
// served, and the caller of standard tags gets 40807.
func TestNoDataClassConcernsItsCallers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			resp := found(r)
			if im.ClassesOf(r.TagList)&im.ClassStandard != 0 {
				for i := range resp.UserProfileItem {
					if it := &resp.UserProfileItem[i]; it.ToAccount == "nostd" {
						it.ProfileItem, it.ResultCode, it.ResultInfo = nil, 40807, "no standard data"
					}
				}
			}
			return resp, nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g, DefaultTags: []string{"Tag_Profile_IM_Level"}})
		std := loadAsync(h.b, context.Background(), "nostd", "Tag_Profile_IM_Nick")
		custom := loadAsync(h.b, context.Background(), "nostd", "Tag_Profile_Custom_Test")
		other := loadAsync(h.b, context.Background(), "u1", "Tag_Profile_IM_Nick")
		h.waitQueued(t, 2)
		feed(t, g)
		if l := <-std; l.err != nil || l.res.Item.ResultCode != 40807 {
			t.Fatalf("standard caller %+v %v", l.res.Item, l.err)
		}
		if l := <-custom; l.err != nil || l.res.Item.ResultCode != 0 || value(l.res, "Tag_Profile_Custom_Test") == "" {
			t.Fatalf("custom caller %+v %v", l.res.Item, l.err)
		}
		if l := <-other; l.err != nil || l.res.Item.ResultCode != 0 {
			t.Fatalf("other account %+v %v", l.res.Item, l.err)
		}
		calls := up.Calls()
		if len(calls) != 2 || !slices.Equal(calls[1].TagList, []string{"Tag_Profile_Custom_Test"}) {
			t.Fatalf("calls %+v", calls)
		}
		if got := testutil.ToFloat64(h.m.IsolationCalls.WithLabelValues(metrics.IsolateClass)); got != 1 {
			t.Fatalf("isolation_calls_total{cause=class} = %v", got)
		}
	})
}

// TestTagUnionOverLimitSplit: callers whose tags together exceed what one
// call may carry are sent in parts, none over the limit.
func TestTagUnionOverLimitSplit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			if len(r.TagList) > im.MaxTagsPerCall {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 40001, Info: "too many tags"}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 4 {
			var tags []string
			for j := range 40 {
				tags = append(tags, fmt.Sprintf("Tag_Profile_Custom_%c%c", 'A'+i, 'A'+j))
			}
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), tags...))
		}
		h.waitQueued(t, 4)
		feed(t, g)
		for i, ch := range chans {
			if l := <-ch; l.err != nil {
				t.Fatalf("caller %d: %v", i, l.err)
			}
		}
		for _, c := range up.Calls() {
			if len(c.TagList) > im.MaxTagsPerCall {
				t.Fatalf("a call carried %d tags", len(c.TagList))
			}
		}
	})
}

func TestCulprit(t *testing.T) {
	for _, tc := range []struct {
		code int
		info string
		tags []string
		want string
	}{
		{40009, "tag does not exist: Tag_Profile_Custom_Ab", []string{"Tag_Profile_Custom_A", "Tag_Profile_Custom_Ab"}, "Tag_Profile_Custom_Ab"},
		{40009, "tag does not exist", []string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_A"}, "Tag_Profile_Custom_A"},
		{40009, "tag does not exist", []string{"Tag_Profile_Custom_B", "Tag_Profile_Custom_A"}, ""},
		{40007, "no permission", []string{"Tag_Profile_Custom_S"}, "Tag_Profile_Custom_S"},
		{40007, "no permission", []string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_S"}, ""},
	} {
		if got := culprit(&upstream.Error{Code: tc.code, Info: tc.info}, tc.tags); got != tc.want {
			t.Errorf("culprit(%d %q, %v) = %q, want %q", tc.code, tc.info, tc.tags, got, tc.want)
		}
	}
}

// TestRejectedAccountRemembered: once isolation pinned a refusal on an
// account, the same lookup is refused at once for RejectTTL, without a
// call; other tags and, after RejectTTL, the same ones are asked again.
func TestRejectedAccountRemembered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: picky(nil, "bad.id")}
		var now atomic.Int64
		now.Store(time.Unix(1_700_000_000, 0).UnixNano())
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g, RejectTTL: time.Minute, Now: func() time.Time { return time.Unix(0, now.Load()) }})
		feed(t, g)
		for i := range 3 {
			_, err := h.b.Load(context.Background(), "bad.id", []string{"Tag_Profile_IM_Nick"})
			var ue *upstream.Error
			if !errors.As(err, &ue) || ue.Code != 60015 || !strings.Contains(ue.Info, "bad.id") {
				t.Fatalf("lookup %d: %v", i, err)
			}
		}
		if n := len(up.Calls()); n != 1 {
			t.Fatalf("%d calls: a remembered refusal must cost none", n)
		}
		h.b.Load(context.Background(), "bad.id", []string{"Tag_Profile_IM_Gender"})
		now.Add(int64(time.Minute))
		h.b.Load(context.Background(), "bad.id", []string{"Tag_Profile_IM_Nick"})
		if n := len(up.Calls()); n != 3 {
			t.Fatalf("%d calls, want 3 (other tags, then past RejectTTL)", n)
		}
	})
}

// TestIsolationBudgetBoundsManyRejectedAccounts: a batch of 100 accounts
// all refused with 60015 costs at most 2·⌈log₂ 100⌉ isolation calls after
// the refused one; every caller still gets 60015, and the accounts left
// unresolved are counted.
func TestIsolationBudgetBoundsManyRejectedAccounts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var bad []string
		for i := range 100 {
			bad = append(bad, fmt.Sprintf("bad%d", i))
		}
		up := &fakeUpstream{fn: picky(nil, bad...)}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for _, a := range bad {
			chans = append(chans, loadAsync(h.b, context.Background(), a, "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 100)
		feed(t, g)
		for _, ch := range chans {
			var ue *upstream.Error
			if l := <-ch; !errors.As(l.err, &ue) || ue.Code != 60015 {
				t.Fatal(l.err)
			}
		}
		if n := len(up.Calls()); n > 1+2*7 {
			t.Fatalf("100 refused accounts cost %d calls", n)
		}
		if n := testutil.ToFloat64(h.m.IsolationGaveUp); n == 0 {
			t.Fatal("unresolved accounts not counted")
		}
	})
}

// TestTagCaused40001ProbedTwice: a 40001 caused by the tag list (not by
// an account) for 64 accounts is pinned on the tags after two accounts are
// sent alone and refused: 3 calls, not one per account; every caller gets
// 40001 with its TagList named.
func TestTagCaused40001ProbedTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			if len(r.TagList) > 40 {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 40001, Info: "could not unpack"}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var tags []string
		for j := range 50 {
			tags = append(tags, fmt.Sprintf("Tag_Profile_Custom_Q%c%c", 'A'+j/26, 'A'+j%26))
		}
		var chans []chan loaded
		for i := range 64 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), tags...))
		}
		h.waitQueued(t, 64)
		feed(t, g)
		for _, ch := range chans {
			var ue *upstream.Error
			if l := <-ch; !errors.As(l.err, &ue) || ue.Code != 40001 || !strings.Contains(ue.Info, "Tag_Profile_Custom_QAA") {
				t.Fatal(l.err)
			}
		}
		if n := len(up.Calls()); n != 3 {
			t.Fatalf("tag-caused 40001 for 64 accounts cost %d calls, want 3", n)
		}
	})
}

// TestAccountCaused40001ProbeThenHalves: a 40001 caused by one account
// among 8 (one tag set): the probe account is answered, the rest is
// halved down to the bad account; the others get their values.
func TestAccountCaused40001ProbeThenHalves(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			if slices.Contains(r.ToAccount, "u5") {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 40001, Info: "could not unpack"}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 8 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
		}
		h.waitQueued(t, 8)
		feed(t, g)
		for i, ch := range chans {
			l := <-ch
			var ue *upstream.Error
			if i == 5 {
				if !errors.As(l.err, &ue) || ue.Code != 40001 || !strings.Contains(ue.Info, `"u5"`) {
					t.Fatalf("u5: %v", l.err)
				}
			} else if l.err != nil {
				t.Fatalf("u%d: %v", i, l.err)
			}
		}
		if n := len(up.Calls()); n > 1+1+1+2*3 { // refused, probe, the other 7, halves down to u5
			t.Fatalf("%d calls", n)
		}
	})
}

// TestNamedBadDefaultTagLearnedWithTwoTagSets: a default tag the upstream
// refuses by name is learned at the first refusal even when the batch
// holds two tag sets, and costs nothing after: 2 calls in the first round,
// 1 in each later one.
func TestNamedBadDefaultTagLearnedWithTwoTagSets(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: picky(nil)}
		g := newGate()
		tl := &learner{}
		h := start(t, Config{Upstream: up, Limiter: g, Tags: tl, DefaultTags: []string{"Tag_Profile_Custom_Gone"}})
		for round := range 3 {
			a := loadAsync(h.b, context.Background(), fmt.Sprintf("a%d", round), "Tag_Profile_IM_Nick")
			b := loadAsync(h.b, context.Background(), fmt.Sprintf("b%d", round), "Tag_Profile_IM_Gender")
			h.waitQueued(t, 2)
			before := len(up.Calls())
			stop := make(chan struct{})
			go func() {
				for {
					select {
					case g.ch <- struct{}{}:
					case <-stop:
						return
					}
				}
			}()
			la, lb := <-a, <-b
			close(stop)
			if la.err != nil || lb.err != nil {
				t.Fatal(la.err, lb.err)
			}
			want := 1
			if round == 0 {
				want = 2
			}
			if n := len(up.Calls()) - before; n != want {
				t.Fatalf("round %d: %d calls, want %d", round, n, want)
			}
		}
		if !tl.Refused("Tag_Profile_Custom_Gone") {
			t.Fatal("bad default tag never learned")
		}
	})
}

// TestFirstProbeAccountCaused40001: the account sent alone first is the
// one causing the 40001: a second account alone is answered, so only the
// first gets 40001 (naming it) and every other caller its values.
func TestFirstProbeAccountCaused40001(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{fn: func(_ int, r im.GetRequest) (*im.GetResponse, error) {
			if slices.Contains(r.ToAccount, "u0") {
				return nil, &upstream.Error{Kind: im.KindRejected, Code: 40001, Info: "could not unpack"}
			}
			return found(r), nil
		}}
		g := newGate()
		h := start(t, Config{Upstream: up, Limiter: g})
		var chans []chan loaded
		for i := range 8 {
			chans = append(chans, loadAsync(h.b, context.Background(), fmt.Sprintf("u%d", i), "Tag_Profile_IM_Nick"))
			h.waitQueued(t, i+1) // u0 first in the batch
		}
		feed(t, g)
		for i, ch := range chans {
			l := <-ch
			var ue *upstream.Error
			if i == 0 {
				if !errors.As(l.err, &ue) || ue.Code != 40001 || !strings.Contains(ue.Info, `"u0"`) {
					t.Fatalf("u0: %v", l.err)
				}
			} else if l.err != nil {
				t.Fatalf("u%d: %v", i, l.err)
			}
		}
		if n := len(up.Calls()); n != 4 { // refused, u0 alone, u1 alone, the other 6
			t.Fatalf("%d calls", n)
		}
	})
}
