package cache

import (
	"testing"
	"time"
)

// Imported versions its invalidation at `at` (Deleted uses at+ClockSkew).
// A "not found" fetched by a replica whose clock is ahead (within
// -clock-skew), sent BEFORE the import and stored after it, must not make
// the imported account "not found" for -negative-ttl: a fetch replaces an
// invalidation only when sent more than the skew after it (supersedes).
func TestImportBeatsSkewedEarlierNotFound(t *testing.T) {
	skew := int64(1000)
	at := time.Now().Truncate(time.Millisecond)
	now := at
	imp := &Record{}
	for _, tg := range importTags {
		imp.put(TagValue{Tag: tg, Origin: FromInvalidate, Ver: at.UnixMilli(), Fresh: now, Stale: now})
	}
	old := merge(&Record{NotFoundCode: 40003, NotFoundUntil: now.Add(time.Hour), NotFoundVer: at.UnixMilli() - 5000}, imp, skew)
	if old.NotFoundCode != 0 {
		t.Fatal("import did not clear")
	}
	// Sent 600 ms before the import, on a clock 900 ms ahead (< skew).
	neg := &Record{NotFoundCode: 40003, NotFoundUntil: now.Add(time.Hour), NotFoundVer: at.UnixMilli() - 600 + 900}
	if got := merge(old, neg, skew); got.NotFoundCode != 0 {
		t.Fatalf("a not-found fetched before the import (clock within -clock-skew) is stored after it: %+v", got)
	}
}
