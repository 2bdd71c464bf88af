package cache

import (
	"context"
	"encoding/json"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// batchedLoader answers Loads from one goroutine in groups of up to 100,
// the way the batcher does: the caller's goroutine parks until the group's
// answer comes.
type batchedLoader struct {
	in chan batchedLoad
}

type batchedLoad struct {
	account string
	tags    []string
	done    chan Fetched
}

func newBatchedLoader() (*batchedLoader, func()) {
	l := &batchedLoader{in: make(chan batchedLoad, 1024)}
	stop := make(chan struct{})
	go func() {
		value := json.RawMessage(`"nick"`)
		group := make([]batchedLoad, 0, 100)
		for {
			select {
			case <-stop:
				return
			case q := <-l.in:
				group = append(group[:0], q)
			}
			for len(group) < cap(group) {
				select {
				case q := <-l.in:
					group = append(group, q)
					continue
				default:
				}
				break
			}
			sent := time.Now()
			for _, q := range group {
				items := make([]im.ProfileItem, 0, len(q.tags))
				for _, t := range q.tags {
					items = append(items, im.ProfileItem{Tag: t, Value: value})
				}
				q.done <- Fetched{Item: im.UserProfile{ToAccount: q.account, ProfileItem: items}, Tags: q.tags, Sent: sent}
			}
		}
	}()
	return l, func() { close(stop) }
}

func (*batchedLoader) Admit(int, time.Time, bool) (Ticket, error) { return nil, nil }
func (*batchedLoader) Promote(string)                             {}

func (l *batchedLoader) Load(ctx context.Context, lk Lookup) (Fetched, error) {
	q := batchedLoad{account: lk.Account, tags: lk.Tags, done: make(chan Fetched, 1)}
	l.in <- q
	select {
	case f := <-q.done:
		return f, nil
	case <-ctx.Done():
		return Fetched{}, ctx.Err()
	}
}

// BenchmarkMiss is the cache's cold path: concurrent lookups of one new
// account each (one tag), every one missed in the in-process tier and
// loaded through a Loader that answers in groups from another goroutine.
// It measures the cache's own cost per missed account: its flight, the
// write-back and the answer.
func BenchmarkMiss(b *testing.B) {
	l, stop := newBatchedLoader()
	defer stop()
	c, err := New(Config{Loader: l, Metrics: metrics.New(prometheus.NewRegistry())})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var next atomic.Int64
	tags := []string{"Tag_Profile_IM_Nick"}
	b.SetParallelism(64)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		accounts := make([]string, 1)
		for pb.Next() {
			accounts[0] = "u" + strconv.FormatInt(next.Add(1), 10)
			if a := c.Get(context.Background(), accounts, tags); a[0].Source != SourceUpstream || a[0].Err != nil {
				b.Errorf("answered from %s: %v", a[0].Source, a[0].Err)
				return
			}
		}
	})
}
