package badtags

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

func TestConfiguredCustomTags(t *testing.T) {
	s, err := New(Config{Custom: []string{"Tag_Profile_Custom_Test"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, bad := s.Check([]string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Test"}); bad {
		t.Fatal("configured and standard tags refused")
	}
	code, info, bad := s.Check([]string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Nope"})
	if !bad || code != im.CodeTagNotExist || !strings.Contains(info, "Tag_Profile_Custom_Nope") {
		t.Fatalf("unconfigured custom tag: %d %q %v", code, info, bad)
	}
	if _, err := New(Config{Custom: []string{"Tag_Profile_IM_Nick"}}); err == nil {
		t.Fatal("a standard tag accepted as a custom one")
	}
	if _, err := New(Config{Custom: []string{"Tag_Profile_Custom_Toolongname"}}); err == nil {
		t.Fatal("an invalid custom tag accepted")
	}
}

func TestLearnTTLAndBounds(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	s, _ := New(Config{TTL: time.Minute, Max: 3, Now: clk.Now})
	s.Learn("Tag_Profile_Custom_Nope", 40009, "tag does not exist: Tag_Profile_Custom_Nope")
	s.Learn("Tag_Profile_Custom_Odd", im.CodeInternal, "not a tag refusal") // ignored
	s.Learn("not a tag", 40009, "x")                                        // ignored
	code, info, bad := s.Check([]string{"Tag_Profile_IM_Nick", "Tag_Profile_Custom_Nope"})
	if !bad || code != 40009 || !strings.Contains(info, "Tag_Profile_Custom_Nope") {
		t.Fatalf("learned tag: %d %q %v", code, info, bad)
	}
	if got := s.Learned(); len(got) != 1 {
		t.Fatalf("learned %v", got)
	}
	for _, tag := range []string{"Tag_Profile_Custom_A", "Tag_Profile_Custom_B", "Tag_Profile_Custom_C"} {
		s.Learn(tag, 40007, strings.Repeat("x", 10_000))
	}
	if got := s.Learned(); len(got) != 3 {
		t.Fatalf("Max 3 not held: %v", got)
	}
	if _, info, _ := s.Check([]string{"Tag_Profile_Custom_A"}); len(info) > maxInfo+20 {
		t.Fatalf("info not clipped: %d bytes", len(info))
	}
	clk.Add(time.Minute)
	if _, _, bad := s.Check([]string{"Tag_Profile_Custom_Nope", "Tag_Profile_Custom_A"}); bad {
		t.Fatal("refused past TTL")
	}
}

func newClient(t *testing.T, srv *redistest.Server) redis.UniversalClient {
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { c.Close() })
	return c
}

func run(t *testing.T, s *Set) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// TestSharedThroughRedis: a tag learned on one replica is refused by
// another at once (announced), and by a replica that starts later (read
// from the hash).
func TestSharedThroughRedis(t *testing.T) {
	srv := redistest.Start(t)
	a, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000})
	b, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000})
	other, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000001})
	run(t, a)
	run(t, b)
	run(t, other)
	wait.For(t, 5*time.Second, "b subscribed", func() bool {
		n, _ := newClient(t, srv).PubSubNumSub(context.Background(), "pp:v2:1400000000:badtags").Result()
		return n["pp:v2:1400000000:badtags"] == 2
	})
	a.Learn("Tag_Profile_Custom_Nope", 40009, "tag does not exist: Tag_Profile_Custom_Nope")
	wait.For(t, 5*time.Second, "b learns", func() bool { return b.Refused("Tag_Profile_Custom_Nope") })
	late, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000})
	run(t, late)
	wait.For(t, 5*time.Second, "a replica started later learns", func() bool { return late.Refused("Tag_Profile_Custom_Nope") })
	if other.Refused("Tag_Profile_Custom_Nope") {
		t.Fatal("another app learned this app's tag")
	}
}

// TestForgedRedisEntries: entries and announcements that do not decode,
// carry a code that is not a tag refusal, name no tag, or claim to last
// past TTL + skew are ignored.
func TestForgedRedisEntries(t *testing.T) {
	srv := redistest.Start(t)
	c := newClient(t, srv)
	ctx := context.Background()
	key := "pp:v2:1400000000:badtags"
	future := strconv.FormatInt(time.Now().Add(1000*time.Hour).UnixMilli(), 10)
	soon := strconv.FormatInt(time.Now().Add(30*time.Second).UnixMilli(), 10)
	c.HSet(ctx, key,
		"Tag_Profile_Custom_Ok", "40009|"+soon+"|tag does not exist",
		"Tag_Profile_Custom_Far", "40009|"+future+"|from the future",
		"Tag_Profile_Custom_Code", "40006|"+future+"|internal",
		"Not_A_Tag", "40009|"+future+"|x",
		"Tag_Profile_Custom_Junk", "garbage",
		"Tag_Profile_Custom_Past", "40009|1|expired",
		"Tag_Profile_Custom_Huge", "40007|"+soon+"|"+strings.Repeat("y", 1<<20))
	s, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000, TTL: time.Minute})
	run(t, s)
	wait.For(t, 5*time.Second, "the valid entry read", func() bool { return s.Refused("Tag_Profile_Custom_Ok") })
	c.Publish(ctx, key, "Tag_Profile_Custom_FarPub\x0040009|"+future+"|announced")
	c.Publish(ctx, key, "no separator at all")
	c.Publish(ctx, key, "Tag_Profile_Custom_Bad\x0070009|"+future+"|wrong code")
	c.Publish(ctx, key, "Tag_Profile_Custom_Pub\x0040009|"+soon+"|announced") // last: read after the others
	wait.For(t, 5*time.Second, "the valid announcement read", func() bool { return s.Refused("Tag_Profile_Custom_Pub") })
	got := s.Learned()
	want := []string{"Tag_Profile_Custom_Huge", "Tag_Profile_Custom_Ok", "Tag_Profile_Custom_Pub"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("learned %v, want %v", got, want)
	}
	for _, r := range *s.learned.Load() {
		if r.Until.After(time.Now().Add(time.Minute+time.Second)) || len(r.Info) > maxInfo {
			t.Fatalf("entry past TTL or info not clipped: %+v", r)
		}
	}
}

// TestForgedSharedEntriesIgnored: entries an attacker writes to the shared
// hash that the upstream could never have sent (40009 for a standard tag,
// 40009 for a configured custom tag) or that last past TTL + skew are
// ignored; a plausible entry written with them is learned (the hash was
// read). Learn ignores the same refusals.
func TestForgedSharedEntriesIgnored(t *testing.T) {
	srv := redistest.Start(t)
	c := newClient(t, srv)
	key := "pp:v2:1400000000:badtags"
	ms := func(d time.Duration) string { return strconv.FormatInt(time.Now().Add(d).UnixMilli(), 10) }
	c.HSet(context.Background(), key,
		"Tag_Profile_IM_Nick", "40009|"+ms(time.Minute)+"|forged",
		"Tag_Profile_IM_Gender", "40801|"+ms(time.Minute)+"|forged",
		"Tag_Profile_Custom_Test", "40009|"+ms(time.Minute)+"|forged",
		"Tag_Profile_Custom_Far", "40007|"+ms(1000*time.Hour)+"|forged",
		"Tag_Profile_Custom_Real", "40007|"+ms(time.Minute)+"|no permission")
	s, err := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000, Custom: []string{"Tag_Profile_Custom_Test", "Tag_Profile_Custom_Far", "Tag_Profile_Custom_Real"}})
	if err != nil {
		t.Fatal(err)
	}
	run(t, s)
	wait.For(t, 5*time.Second, "the plausible entry learned", func() bool { return s.Refused("Tag_Profile_Custom_Real") })
	for _, tag := range []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Gender", "Tag_Profile_Custom_Test", "Tag_Profile_Custom_Far"} {
		if code, info, bad := s.Check([]string{tag}); bad {
			t.Errorf("forged entry refuses %s: %d %q", tag, code, info)
		}
	}
	s.Learn("Tag_Profile_IM_Nick", 40009, "x")
	s.Learn("Tag_Profile_Custom_Test", 40009, "x")
	if got := s.Learned(); len(got) != 1 {
		t.Errorf("learned %v, want only Tag_Profile_Custom_Real", got)
	}
}

// TestSharedHashPruned: refusals that expired are removed from the shared
// hash (by the next share of the replica that saw them expire), so the
// hash holds no more fields than live refusals.
func TestSharedHashPruned(t *testing.T) {
	srv := redistest.Start(t)
	// The refusals expire on a clock the test moves (the hash's own PEXPIRE
	// is on Redis's clock, a minute ahead: it does not race the test).
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	s, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000, TTL: time.Minute,
		Now: func() time.Time { return time.Unix(0, now.Load()) }})
	run(t, s)
	c := newClient(t, srv)
	key := "pp:v2:1400000000:badtags"
	for i, tag := range []string{"Tag_Profile_Custom_A", "Tag_Profile_Custom_B", "Tag_Profile_Custom_C", "Tag_Profile_Custom_D"} {
		s.Learn(tag, 40009, "x")
		wait.For(t, 5*time.Second, "shared", func() bool { return c.HExists(context.Background(), key, tag).Val() })
		if i < 3 {
			now.Add(int64(40 * time.Second))
		}
	}
	wait.For(t, 5*time.Second, "expired fields removed", func() bool {
		return c.HLen(context.Background(), key).Val() <= int64(len(s.Learned()))
	})
	if c.HExists(context.Background(), key, "Tag_Profile_Custom_A").Val() {
		t.Fatal("the first, expired refusal is still shared")
	}
}

// TestReloadPrunesAndStopsAtMax: a reload keeps at most Max valid entries
// and removes expired and undecodable fields from the hash; a field
// rewritten since is kept.
func TestReloadPrunesAndStopsAtMax(t *testing.T) {
	srv := redistest.Start(t)
	c := newClient(t, srv)
	ctx := context.Background()
	key := "pp:v2:1400000000:badtags"
	soon := strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10)
	c.HSet(ctx, key, "Tag_Profile_Custom_Old", "40009|1|expired", "Tag_Profile_Custom_Junk", "garbage", "Not_A_Tag", "40009|"+soon+"|x")
	for _, x := range "ABCDEFGHIJ" {
		c.HSet(ctx, key, "Tag_Profile_Custom_"+string(x), "40009|"+soon+"|x")
	}
	s, _ := New(Config{Client: newClient(t, srv), SDKAppID: 1400000000, Max: 4})
	s.reload(ctx)
	if n := len(s.Learned()); n != 4 {
		t.Fatalf("learned %d entries, want Max 4", n)
	}
	for _, f := range []string{"Tag_Profile_Custom_Old", "Tag_Profile_Custom_Junk", "Not_A_Tag"} {
		if c.HExists(ctx, key, f).Val() {
			t.Errorf("%s not removed from the hash", f)
		}
	}
	if n := c.HLen(ctx, key).Val(); n != 10 {
		t.Fatalf("hash holds %d fields, want the 10 valid ones", n)
	}
}

// BenchmarkReload50k: a reload of a hash holding 50,000 valid-looking
// entries (an attacker's) on a fresh Set: bounded by Max, not by the hash.
func BenchmarkReload50k(b *testing.B) {
	srv := redistest.Start(b)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer c.Close()
	ctx := context.Background()
	key := "pp:v2:1400000000:badtags"
	until := strconv.FormatInt(time.Now().Add(5*time.Minute).UnixMilli(), 10)
	args := make([]any, 0, 2000)
	for i := range 50_000 {
		name := "Tag_Profile_Custom_" + string(rune('A'+i%26)) + string(rune('A'+i/26%26)) + string(rune('A'+i/676%26)) + string(rune('A'+i/17576%26))
		args = append(args, name, "40009|"+until+"|forged")
		if len(args) == cap(args) {
			c.HSet(ctx, key, args...)
			args = args[:0]
		}
	}
	for b.Loop() {
		s, _ := New(Config{Client: c, SDKAppID: 1400000000})
		s.reload(ctx)
		if n := len(s.Learned()); n != 1024 {
			b.Fatalf("learned %d", n)
		}
	}
}
