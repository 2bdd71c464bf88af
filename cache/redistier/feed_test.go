package redistier

import (
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
)

// A negative entry travels on the change feed with the tags.
func TestChangeMessageCarriesNegativeEntry(t *testing.T) {
	now := time.UnixMilli(time.Now().UnixMilli())
	rec := &cache.Record{NotFoundCode: 40003, NotFoundInfo: "account does not exist (deleted)", NotFoundUntil: now.Add(time.Minute), NotFoundVer: now.UnixMilli()}
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
