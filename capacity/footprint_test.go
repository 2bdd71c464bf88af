package capacity

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/cache/redistier"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

// footprintTags are added one by one: the emulator's values for them are
// a nick, a 40-byte image URL, a gender enum and a small number.
var footprintTags = []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Image", "Tag_Profile_IM_Gender", "Tag_Profile_IM_Level"}

func footprintRecords(c *cache.Cache, n int, tags []string, now time.Time) []*cache.Record {
	recs := make([]*cache.Record, n)
	for i := range recs {
		a := imsim.AccountName(i)
		it := im.UserProfile{ToAccount: a}
		for _, t := range tags {
			v, _ := imsim.SeededValue(a, t)
			it.ProfileItem = append(it.ProfileItem, im.ProfileItem{Tag: t, Value: v})
		}
		recs[i] = c.Fetched(cache.Fetched{Item: it, Tags: tags, Sent: now}, now)
	}
	return recs
}

func heapNow() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// BenchmarkFootprint measures the memory constants of the model: Go heap
// per account in the in-process tier (cache.Local holding the records the
// cache makes of fetched answers), and Redis memory per account hash
// written by the real Redis tier (MEMORY USAGE of the key, and the growth
// of used_memory, which adds the keyspace's own overhead), with 1, 2 and 4
// tags. Run it alone, once:
//
//	go test -run '^$' -bench Footprint -benchtime 1x ./capacity/
func BenchmarkFootprint(b *testing.B) {
	const n = 20_000
	srv := redistest.Start(b)
	for k := 1; k <= len(footprintTags); k *= 2 {
		tags := footprintTags[:k]
		b.Run("tags="+strconv.Itoa(k), func(b *testing.B) {
			for b.Loop() {
				now := time.Now()
				c, err := cache.New(cache.Config{Loader: noLoader{}, Local: cache.NewLocal(-1)})
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				before := heapNow()
				l := cache.NewLocal(10 * n)
				for i, r := range footprintRecords(c, n, tags, now) {
					l.Merge(imsim.AccountName(i), r, now)
				}
				heap := float64(heapNow()-before) / n
				// Answered once, a record also keeps the items of its first
				// tag list (the hit path then allocates none for it).
				for i := range n {
					if r := l.Get(imsim.AccountName(i), now); r != nil {
						r.Answer(imsim.AccountName(i), tags, now)
					}
				}
				answered := float64(heapNow()-before) / n
				runtime.KeepAlive(l)

				mem, used := redisFootprint(b, srv, c, n, tags, now)
				b.ReportMetric(heap, "heap-B/account")
				b.ReportMetric(answered, "heap-answered-B/account")
				b.ReportMetric(mem, "redis-usage-B/account")
				b.ReportMetric(used, "redis-used-B/account")
			}
		})
	}
}

// redisFootprint writes n accounts' records through the Redis tier into an
// empty database and returns MEMORY USAGE per key and used_memory's growth
// per account.
func redisFootprint(b *testing.B, srv *redistest.Server, c *cache.Cache, n int, tags []string, now time.Time) (usage, used float64) {
	b.Helper()
	if _, err := srv.Do("FLUSHALL"); err != nil {
		b.Fatal(err)
	}
	usedMemory := func() float64 {
		info, err := srv.Do("INFO", "memory")
		if err != nil {
			b.Fatal(err)
		}
		for _, line := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "used_memory:"); ok {
				f, _ := strconv.ParseFloat(v, 64)
				return f
			}
		}
		b.Fatal("no used_memory in INFO")
		return 0
	}
	client, err := redistier.NewClient(srv.URL(), redistier.ClientOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	r, err := redistier.New(redistier.Config{Client: client, SDKAppID: 1400000000})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	base := usedMemory()
	recs := footprintRecords(c, n, tags, now)
	for i, rec := range recs {
		r.Put(ctx, []string{imsim.AccountName(i)}, []*cache.Record{rec})
	}
	wait.For(b, 30*time.Second, fmt.Sprintf("DBSIZE %d", n), func() bool {
		got, err := srv.Do("DBSIZE")
		if err != nil {
			b.Fatal(err)
		}
		return got == strconv.Itoa(n)
	})
	used = (usedMemory() - base) / float64(n)
	const sample = 500
	for i := range sample {
		v, err := srv.Do("MEMORY", "USAGE", r.Key(imsim.AccountName(i)), "SAMPLES", "0")
		if err != nil {
			b.Fatal(err)
		}
		f, _ := strconv.ParseFloat(v, 64)
		usage += f
	}
	return usage / sample, used
}
