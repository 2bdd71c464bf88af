package cache

import (
	"testing"
	"time"
)

// A "not found" entry from the change feed (another replica's, or anyone's
// who can publish to Redis) lasts no longer than this replica's
// -negative-ttl, however long it claims.
func TestFeedNegativeEntryCappedAtNegativeTTL(t *testing.T) {
	local := NewLocal(0)
	c, err := New(Config{Loader: &fakeUpstream{}, Local: local, NegativeTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	now := time.Now()
	c.fromFeed("u1", &Record{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: now.Add(24 * time.Hour), NotFoundVer: now.UnixMilli()}, now)
	got := local.Get("u1", time.Now())
	if got == nil || got.NotFoundCode == 0 {
		t.Fatalf("negative entry not applied: %+v", got)
	}
	if limit := time.Now().Add(time.Second); got.NotFoundUntil.After(limit) {
		t.Fatalf("negative entry from the feed lasts until %v, past -negative-ttl (%v)", got.NotFoundUntil, limit)
	}
}
