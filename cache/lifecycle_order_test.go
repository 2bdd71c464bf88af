package cache

import (
	"context"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
)

// A change older than a known deletion (a change callback for a
// portrait_set made before the account_delete, arriving after it; or a
// portrait_set answered on another replica just before the deletion whose
// write lands after it) must not clear the negative entry and bring the
// deleted account's profile back, in Go (merge) or in Redis (writeScript).
func TestChangeOlderThanDeletionKeepsNotFound(t *testing.T) {
	for _, origin := range []Origin{FromCallback, FromSet} {
		srv := redistest.Start(t)
		var up fakeUpstream
		a, _, _ := newReplica(t, &up, srv.URL())
		b, localB, trB := newReplica(t, &up, srv.URL())
		waitSubscribed(t, trB, 2)
		ctx := context.Background()
		nickOf(t, b, "u1")
		at := time.Now()
		if err := a.Deleted(ctx, []string{"u1"}, at, true); err != nil {
			t.Fatal(err)
		}
		waitLocal(t, func() bool { return localB.Get("u1", time.Now()).state([]string{nick}, time.Now()) == stateNotFound })
		// The change happened 200 ms before the deletion.
		old := at.Add(-200 * time.Millisecond)
		if err := b.Change(ctx, "u1", []im.ProfileItem{{Tag: nick, Value: raw("before delete")}}, origin, old.UnixMilli(), time.Now().Add(-200*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		calls := up.calls.Load()
		c, _, _ := newReplica(t, &up, srv.URL()) // a fresh replica reads Redis
		for name, cc := range map[string]*Cache{"b (in-process)": b, "c (Redis)": c} {
			if ans := cc.Get(ctx, []string{"u1"}, []string{nick}); ans[0].Item.ResultCode != im.CodeAccountNotFound {
				t.Errorf("origin %d, replica %s: deleted account served again: %+v (fetches %d)", origin, name, ans[0].Item, up.calls.Load()-calls)
			}
		}
	}
}
