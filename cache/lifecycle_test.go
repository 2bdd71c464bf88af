package cache

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
)

// The two rules account lifecycle adds to merge, in Go and in the Redis
// write script alike: a stored negative entry drops every (older) tag, and
// a fetch sent before a negative entry cannot store tags over it.
func TestNegativeEntryDropsTagsAndOlderFetches(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	now := time.Now().Truncate(time.Millisecond)
	ver := now.UnixMilli()
	fetched := func(v int64, val string) *Record {
		return &Record{Tags: []TagValue{{Tag: nick, Value: json.RawMessage(`"` + val + `"`), Set: true, Origin: FromFetch, Ver: v,
			Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}}}
	}
	deleted := &Record{NotFoundCode: 40003, NotFoundInfo: "deleted", NotFoundUntil: now.Add(time.Minute), NotFoundVer: ver + 1000}
	writes := []*Record{fetched(ver-500, "before"), deleted, fetched(ver+200, "late answer of a fetch sent before")}
	var mem *Record
	for _, w := range writes {
		mem = merge(mem, w, tr.r.skew)
		tr.r.flush([]write{{"acct", w}})
	}
	if len(mem.Tags) != 0 || mem.NotFoundCode != 40003 {
		t.Fatalf("merge: %+v", mem)
	}
	got, err := tr.r.Get(context.Background(), []string{"acct"}, []string{nick})
	if err != nil {
		t.Fatal(err)
	}
	if d := sameRecord(mem, got[0], []string{nick}); d != "" {
		t.Fatal(d)
	}
	if n, _ := srv.Do("HLEN", tr.r.Key("acct")); n != "1" {
		t.Fatalf("Redis hash holds %s fields, want only the negative entry", n)
	}
	// A fetch sent after the entry is stored, and clears it.
	after := fetched(ver+1500, "after")
	mem = merge(mem, after, tr.r.skew)
	tr.r.flush([]write{{"acct", after}})
	got, _ = tr.r.Get(context.Background(), []string{"acct"}, []string{nick})
	if d := sameRecord(mem, got[0], []string{nick}); d != "" || mem.NotFoundCode != 0 {
		t.Fatalf("%s / %+v", d, mem)
	}
}

// A negative entry travels on the change feed with the tags.
func TestChangeMessageCarriesNegativeEntry(t *testing.T) {
	now := time.UnixMilli(time.Now().UnixMilli())
	rec := &Record{NotFoundCode: 40003, NotFoundInfo: "account does not exist (deleted)", NotFoundUntil: now.Add(time.Minute), NotFoundVer: now.UnixMilli()}
	msg := encodeChange("r1", now, "u:1", rec)
	replica, sent, account, got, ok := decodeChange(msg)
	if !ok || replica != "r1" || !sent.Equal(now) || account != "u:1" || got.NotFoundCode != 40003 || got.NotFoundInfo != rec.NotFoundInfo ||
		!got.NotFoundUntil.Equal(rec.NotFoundUntil) || got.NotFoundVer != rec.NotFoundVer || len(got.Tags) != 0 {
		t.Fatalf("decoded %v %q %v %q %+v", ok, replica, sent, account, got)
	}
	for _, bad := range []string{msg[:len(msg)-3], msg + "\x01!", msg[:len(msg)-len(rec.NotFoundInfo)-3] + "\x01!\x02\x00\x00"} {
		if _, _, _, _, ok := decodeChange(bad); ok {
			t.Fatalf("accepted %q", bad)
		}
	}
}

// Imported and Deleted through one replica reach another replica's
// in-process tier and Redis: "not found" dropped after an import, profile
// replaced by "not found" after a deletion, nothing fetched for it.
func TestLifecycleAcrossReplicas(t *testing.T) {
	srv := redistest.Start(t)
	var up fakeUpstream
	a, _, _ := newReplica(t, &up, srv.URL())
	b, localB, trB := newReplica(t, &up, srv.URL())
	waitSubscribed(t, trB, 2)
	ctx := context.Background()
	if ans := b.Get(ctx, []string{"ghost"}, []string{nick}); ans[0].Item.ResultCode != 40003 {
		t.Fatalf("ghost: %+v", ans[0])
	}
	if err := a.Imported(ctx, []string{"ghost"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	waitLocal(t, func() bool { return localB.Get("ghost", time.Now()).state([]string{nick}, time.Now()) == stateMiss })
	nickOf(t, b, "u1")
	calls := up.calls.Load()
	if err := a.Deleted(ctx, []string{"u1"}, time.Now(), true); err != nil {
		t.Fatal(err)
	}
	waitLocal(t, func() bool { return localB.Get("u1", time.Now()).state([]string{nick}, time.Now()) == stateNotFound })
	if ans := b.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != 40003 || up.calls.Load() != calls {
		t.Fatalf("deleted u1: %+v, %d fetches", ans[0], up.calls.Load()-calls)
	}
	// A fresh replica finds the deletion in Redis.
	c, _, _ := newReplica(t, &up, srv.URL())
	if ans := c.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != 40003 || up.calls.Load() != calls {
		t.Fatalf("deleted u1 on a new replica: %+v", ans[0])
	}
}

func waitLocal(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("the change never reached the other replica's in-process tier")
		}
		time.Sleep(time.Millisecond)
	}
}
