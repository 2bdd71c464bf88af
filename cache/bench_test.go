package cache

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// BenchmarkHit is the cache's hit path: one account, one tag, served from
// the in-process tier.
func BenchmarkHit(b *testing.B) {
	var up fakeUpstream
	c, err := New(Config{Loader: &up, Metrics: metrics.New(prometheus.NewRegistry())})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	accounts, tags := []string{"u1"}, []string{"Tag_Profile_IM_Nick"}
	c.Get(context.Background(), accounts, tags)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if a := c.Get(context.Background(), accounts, tags); a[0].Source != SourceLocal {
				b.Errorf("answered from %s", a[0].Source)
				return
			}
		}
	})
}

// BenchmarkHits is the hit path through Hits, as BenchmarkHit, with each
// caller reusing its buffers.
func BenchmarkHits(b *testing.B) {
	var up fakeUpstream
	c, err := New(Config{Loader: &up, Metrics: metrics.New(prometheus.NewRegistry())})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	accounts, tags := []string{"u1"}, []string{"Tag_Profile_IM_Nick"}
	c.Get(context.Background(), accounts, tags)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var answers []Answer
		var items []im.ProfileItem
		for pb.Next() {
			var ok bool
			answers, items, ok = c.Hits(answers[:0], items[:0], accounts, tags)
			if !ok || answers[0].Source != SourceLocal {
				b.Errorf("not a hit: %v %+v", ok, answers)
				return
			}
		}
	})
}
