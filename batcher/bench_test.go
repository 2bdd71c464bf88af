package batcher

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// BenchmarkCoalesce is the batcher's own cost per account: concurrent
// single-account loads coalesced into calls of up to 100 accounts, against
// an upstream that answers at once and a limiter that always grants.
func BenchmarkCoalesce(b *testing.B) {
	up := &fakeUpstream{fn: func(_ int, req im.GetRequest) (*im.GetResponse, error) { return found(req), nil }}
	bt, err := New(Config{Upstream: up, Limiter: rated{open{}, 1e9}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { bt.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	var next atomic.Int64
	tags := []string{"Tag_Profile_IM_Nick"}
	b.SetParallelism(64)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			a := "u" + strconv.FormatInt(next.Add(1), 10)
			if _, err := bt.Load(context.Background(), a, tags); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	calls := len(up.Calls())
	b.ReportMetric(float64(b.N)/float64(max(1, calls)), "accounts/call")
}
