package limiter

import (
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/redis/go-redis/v9"
)

// TestScriptsShareTheFactorVerbatim: acquire.lua and throttle.lua each
// carry the computation of the factor in force; the copies are equal.
func TestScriptsShareTheFactorVerbatim(t *testing.T) {
	block := func(name, script string) string {
		_, rest, ok1 := strings.Cut(script, "-- factor: begin")
		body, _, ok2 := strings.Cut(rest, "-- factor: end")
		if !ok1 || !ok2 || !strings.Contains(body, "cutAt") {
			t.Fatalf("%s has no factor block", name)
		}
		return body
	}
	if a, b := block("acquire.lua", acquireLua), block("throttle.lua", throttleLua); a != b {
		t.Fatalf("the factor blocks differ:\nacquire.lua:%s\nthrottle.lua:%s", a, b)
	}
}

// TestScriptArguments: the names each script gives its KEYS and ARGV are
// where Shared and the argument structs put them.
func TestScriptArguments(t *testing.T) {
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"}) // never dialled
	defer client.Close()
	s, err := NewShared(SharedConfig{Client: client, App: "1", Rate: 10})
	if err != nil {
		t.Fatal(err)
	}
	window := map[string]any{"window_key": s.zkey}
	queue := map[string]any{"wait_key": s.wkey, "seen_key": s.skey, "held_key": s.rkey}
	both := func(ms ...map[string]any) map[string]any {
		out := map[string]any{}
		for _, m := range ms {
			for k, v := range m {
				out[k] = v
			}
		}
		return out
	}
	all := both(window, queue, map[string]any{"pause_key": s.pkey, "next_key": s.nkey, "cut_key": s.ckey})
	for _, c := range []struct {
		name, script string
		keys         []string
		argv         []any
		want         map[string]any // name in the script → what Go passes there
	}{
		{"acquire.lua", acquireLua, s.keys,
			acquireArgs{quota: 1, spanMs: 2, holdMs: 3, member: "m", intervalUs: 5.5, recoverPerSec: 6.5, staleMs: 7}.argv(),
			both(all, map[string]any{"quota": 1, "span": int64(2), "hold": int64(3), "me": "m", "interval_us": 5.5, "recover": 6.5, "staleMs": int64(7)})},
		{"release.lua", releaseLua, s.releaseKeys, releaseArgs{member: "m", called: true}.argv(),
			both(window, queue, map[string]any{"member": "m", "called": "1"})},
		{"record.lua", recordLua, []string{s.zkey}, recordArgs{holdMs: 1, spanMs: 2, calls: []any{"m", -1}}.argv(),
			both(window, map[string]any{"hold": int64(1), "span": int64(2)})},
		{"throttle.lua", throttleLua, s.keys,
			throttleArgs{pauseMs: 1, cutEveryMs: 2, cutFactor: 3.5, minFactor: 4.5, recoverPerSec: 5.5}.argv(),
			map[string]any{"pause_key": s.pkey, "cut_key": s.ckey, "pause_ms": int64(1), "cut_every_ms": int64(2),
				"cut_factor": 3.5, "min_factor": 4.5, "recover": 5.5}},
	} {
		re := regexp.MustCompile(`(?m)^local (\w+) = (?:tonumber\()?(KEYS|ARGV)\[(\d+)\]`)
		named := 0
		for _, m := range re.FindAllStringSubmatch(c.script, -1) {
			i, _ := strconv.Atoi(m[3])
			var got any
			if m[2] == "KEYS" {
				got = c.keys[i-1]
			} else {
				got = c.argv[i-1]
			}
			if w, ok := c.want[m[1]]; !ok || got != w {
				t.Errorf("%s's %s[%d] is %s: Go passes %v there, want %v", c.name, m[2], i, m[1], got, w)
			}
			named++
		}
		if named != len(c.want) {
			t.Errorf("%s names %d keys and arguments, want %d", c.name, named, len(c.want))
		}
	}
	if first := regexp.MustCompile(`local FIRST_CALL = (\d+)`).FindStringSubmatch(recordLua); first == nil || first[1] != strconv.Itoa(len(recordArgs{}.argv())+1) {
		t.Errorf("record.lua's calls start at %v; recordArgs puts them after 2 arguments", first)
	}
}
