package redistier

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
)

// Tests of the write script: against cache.Merge, after a SCRIPT FLUSH,
// and that its layout is Go's.

// randomWrite is one write as the cache makes them: a fetch (tags or a
// negative entry), a set or a callback, with versions drawn from a narrow
// range so that every rule is hit often.
func randomWrite(rng *rand.Rand, now time.Time, i int) *cache.Record {
	fresh := now.Add(time.Duration(rng.IntN(100)) * time.Second).Truncate(time.Millisecond)
	stale := fresh.Add(time.Hour)
	ver := int64(1_700_000_000_000 + rng.IntN(3_000))
	if rng.IntN(8) == 0 {
		return &cache.Record{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: fresh, NotFoundVer: ver}
	}
	if rng.IntN(6) == 0 { // a class's "no data" entry (40807/40809)
		return cache.NoDataRecord(im.TagClass(1+rng.IntN(2)), "none", ver, fresh)
	}
	rec := &cache.Record{}
	origin := cache.Origin(rng.IntN(4))
	var event int64
	if origin == cache.FromCallback {
		event = int64(1_700_000_000_000 + rng.IntN(3_000))
		if rng.IntN(2) == 0 { // one of a few: exact repeats of a callback happen often
			event = int64(1_700_000_000_000 + 1_000*rng.IntN(3))
		}
	}
	for _, tag := range []string{nick, "Tag_Profile_IM_Level", customTag} {
		if rng.IntN(3) == 0 {
			continue
		}
		v := cache.TagValue{Tag: tag, Origin: origin, Ver: ver, Event: event, Fresh: fresh, Stale: stale}
		if rng.IntN(4) != 0 {
			v.Set, v.Value = true, json.RawMessage(fmt.Sprintf(`"w%d"`, i))
		}
		rec.Put(v)
	}
	return rec
}

func sameRecord(a, b *cache.Record, tags []string) string {
	if a != nil && len(a.Tags) == 0 && a.NotFoundCode == 0 {
		a = nil // an empty write: nothing stored
	}
	if (a == nil) != (b == nil) {
		return fmt.Sprintf("one is nil: %v / %v", a, b)
	}
	if a == nil {
		return ""
	}
	if a.NotFoundCode != b.NotFoundCode || a.NotFoundVer != b.NotFoundVer || a.NotFoundInfo != b.NotFoundInfo ||
		!a.NotFoundUntil.Equal(b.NotFoundUntil) {
		return fmt.Sprintf("negative entries differ: %+v / %+v", *a, *b)
	}
	for _, tag := range tags {
		x, okx := a.Tag(tag)
		y, oky := b.Tag(tag)
		if okx != oky || x.Set != y.Set || x.Origin != y.Origin || x.Ver != y.Ver || x.Event != y.Event ||
			!bytes.Equal(x.Value, y.Value) || !x.Fresh.Equal(y.Fresh) || !x.Stale.Equal(y.Stale) {
			return fmt.Sprintf("%s differs: %+v (%v) / %+v (%v)", tag, x, okx, y, oky)
		}
	}
	return ""
}

// The Redis write script and merge implement the same rules: random write
// sequences leave the same record in both.
func TestWriteScriptMatchesMerge(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	rng := rand.New(rand.NewPCG(7, 9))
	now := time.Now()
	tags := []string{nick, "Tag_Profile_IM_Level", customTag}
	entries := append(slices.Clone(tags), cache.MarkerStandard, cache.MarkerCustom)
	// Sequences that random draws rarely make: a callback, a later write of
	// another origin within the skew, the same callback again.
	fresh, stale := now.Add(time.Minute).Truncate(time.Millisecond), now.Add(time.Hour).Truncate(time.Millisecond)
	tv := func(o cache.Origin, ver, event int64, v string) *cache.Record {
		return &cache.Record{Tags: []cache.TagValue{{Tag: nick, Value: raw(v), Set: true, Origin: o, Ver: ver, Event: event, Fresh: fresh, Stale: stale}}}
	}
	neg := func(ver int64) *cache.Record {
		return &cache.Record{NotFoundCode: 40003, NotFoundInfo: "gone", NotFoundUntil: fresh, NotFoundVer: ver}
	}
	const e = 1_700_000_000_000
	scripted := [][]*cache.Record{
		{tv(cache.FromCallback, e+100, e, "A"), tv(cache.FromSet, e+200, 0, "B"), tv(cache.FromCallback, e+300, e, "A")},
		{tv(cache.FromCallback, e+100, e, "A"), tv(cache.FromFetch, e+1200, 0, "B"), tv(cache.FromCallback, e+1300, e, "A")},
		{tv(cache.FromCallback, e+100, e, "A"), tv(cache.FromInvalidate, e+200, 0, ""), tv(cache.FromCallback, e+300, e, "A")},
		{tv(cache.FromInvalidate, e+200, 0, ""), tv(cache.FromFetch, e+700, 0, "B"), tv(cache.FromFetch, e+1300, 0, "C")},
		{tv(cache.FromCallback, e+100, e, "A"), tv(cache.FromSet, e+200, 0, "B"), tv(cache.FromCallback, e+300, e+1, "C")},
		// A deletion (negative entry) and changes from before it arriving
		// late: a callback (by EventTime), a set; then ones from after it,
		// and an import (invalidation) from before it.
		{tv(cache.FromFetch, e, 0, "A"), neg(e + 1000), tv(cache.FromCallback, e+1500, e+500, "B"), tv(cache.FromSet, e+900, 0, "C")},
		{neg(e + 1000), tv(cache.FromCallback, e+1500, e+1000, "B")},
		{neg(e + 1000), tv(cache.FromSet, e+1100, 0, "C")},
		{neg(e + 1000), tv(cache.FromInvalidate, e+500, 0, "")},
		// class entries: within the skew of a set (not stored), past it
		// (stored), then a set of the class (clears it), a fetch sent
		// before the entry (keeps it).
		{tv(cache.FromSet, e+100, 0, "A"), cache.NoDataRecord(im.ClassStandard, "none", e+600, fresh)},
		{tv(cache.FromSet, e+100, 0, "A"), cache.NoDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(cache.FromSet, e+1300, 0, "B")},
		{cache.NoDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(cache.FromFetch, e+1100, 0, "B")},
		{cache.NoDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(cache.FromFetch, e+1300, 0, "B")},
		{cache.NoDataRecord(im.ClassCustom, "none", e+1200, fresh), tv(cache.FromSet, e+1300, 0, "B")},
		{cache.NoDataRecord(im.ClassStandard, "none", e+1200, fresh), tv(cache.FromCallback, e+1300, e+200, "B")},
	}
	for k, seq := range scripted {
		account := fmt.Sprint("scripted", k)
		var mem *cache.Record
		for _, upd := range seq {
			mem = cache.Merge(mem, upd, tr.r.skew)
			tr.r.flush([]write{{account, upd}})
		}
		got, err := tr.r.Get(context.Background(), []string{account}, tags)
		if err != nil {
			t.Fatal(err)
		}
		if d := sameRecord(mem, got[0], entries); d != "" {
			t.Fatalf("scripted %d: %s", k, d)
		}
	}
	for trial := range 300 {
		account := fmt.Sprint("acct", trial)
		var mem *cache.Record
		var seq []string
		for i := range 1 + rng.IntN(8) {
			upd := randomWrite(rng, now, i)
			seq = append(seq, fmt.Sprintf("%+v", *upd))
			mem = cache.Merge(mem, upd, tr.r.skew)
			tr.r.flush([]write{{account, upd}})
		}
		got, err := tr.r.Get(context.Background(), []string{account}, tags)
		if err != nil {
			t.Fatal(err)
		}
		if d := sameRecord(mem, got[0], entries); d != "" {
			t.Fatalf("trial %d: %s\nwrites:\n%s", trial, d, strings.Join(seq, "\n"))
		}
	}
	if n := testutil.ToFloat64(tr.m.RedisDropped); n != 0 {
		t.Fatalf("%v writes dropped", n)
	}
}

// The write script survives a Redis that lost its scripts (restart,
// failover): the pipeline is sent again with the script's text.
func TestWriteAfterScriptFlush(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	now := time.Now()
	tr.r.flush([]write{{"a", testRecord("a", now)}})
	if _, err := srv.Do("SCRIPT", "FLUSH"); err != nil {
		t.Fatal(err)
	}
	tr.r.flush([]write{{"b", testRecord("b", now)}})
	got, err := tr.r.Get(context.Background(), []string{"a", "b"}, []string{nick})
	if err != nil || got[0] == nil || got[1] == nil {
		t.Fatalf("records after SCRIPT FLUSH: %v, %v", got, err)
	}
	if !tr.r.Up() {
		t.Fatal("tier marked down by NOSCRIPT")
	}
}

// The two rules account lifecycle adds to merge, in Go and in the Redis
// write script alike: a stored negative entry drops every (older) tag, and
// a fetch sent before a negative entry cannot store tags over it.
func TestNegativeEntryDropsTagsAndOlderFetches(t *testing.T) {
	srv := redistest.Start(t)
	tr := startTier(t, srv.URL(), 1400000000)
	now := time.Now().Truncate(time.Millisecond)
	ver := now.UnixMilli()
	fetched := func(v int64, val string) *cache.Record {
		return &cache.Record{Tags: []cache.TagValue{{Tag: nick, Value: json.RawMessage(`"` + val + `"`), Set: true, Origin: cache.FromFetch, Ver: v,
			Fresh: now.Add(time.Minute), Stale: now.Add(time.Hour)}}}
	}
	deleted := &cache.Record{NotFoundCode: 40003, NotFoundInfo: "deleted", NotFoundUntil: now.Add(time.Minute), NotFoundVer: ver + 1000}
	writes := []*cache.Record{fetched(ver-500, "before"), deleted, fetched(ver+200, "late answer of a fetch sent before")}
	var mem *cache.Record
	for _, w := range writes {
		mem = cache.Merge(mem, w, tr.r.skew)
		tr.r.flush([]write{{"acct", w}})
	}
	if len(mem.Tags) != 0 || mem.NotFoundCode != 40003 {
		t.Fatalf("merge: %+v", mem)
	}
	got, err := tr.r.Get(context.Background(), []string{"acct"}, []string{nick})
	if err != nil {
		t.Fatal(err)
	}
	if d := sameRecord(mem, got[0], []string{nick}); d != "" {
		t.Fatal(d)
	}
	if n, _ := srv.Do("HLEN", tr.r.Key("acct")); n != "1" {
		t.Fatalf("Redis hash holds %s fields, want only the negative entry", n)
	}
	// A fetch sent after the entry is stored, and clears it.
	after := fetched(ver+1500, "after")
	mem = cache.Merge(mem, after, tr.r.skew)
	tr.r.flush([]write{{"acct", after}})
	got, _ = tr.r.Get(context.Background(), []string{"acct"}, []string{nick})
	if d := sameRecord(mem, got[0], []string{nick}); d != "" || mem.NotFoundCode != 0 {
		t.Fatalf("%s / %+v", d, mem)
	}
}

// luaLayout returns the `local NAME = value  -- layout: …` lines of a
// script (NAME → value), and the script without them.
func luaLayout(t *testing.T, script string) (map[string]string, string) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^local ([A-Z_]+) = (\S+) +-- layout: .*\n`)
	layout := map[string]string{}
	for _, m := range re.FindAllStringSubmatch(script, -1) {
		if _, dup := layout[m[1]]; dup {
			t.Fatalf("layout %s named twice", m[1])
		}
		layout[m[1]] = m[2]
	}
	return layout, re.ReplaceAllString(script, "")
}

// TestWriteScriptLayout: the numbers and names write.lua reads fields by
// are Go's (codec.go and cache's record model), and the script has no
// other copy of them: changing either side alone fails here.
func TestWriteScriptLayout(t *testing.T) {
	lua := func(s string) string { return "'" + s + "'" }
	want := map[string]string{
		"FIELD_HEAD":        strconv.Itoa(fieldHead),
		"VER_AT":            strconv.Itoa(fieldVer + 1),
		"EVENT_AT":          strconv.Itoa(fieldEvent + 1),
		"VER_LEN":           strconv.Itoa(verLen),
		"NEG_VER_AT":        strconv.Itoa(negVer + 1),
		"ORIGIN_UNIT":       strconv.Itoa(1 << originShift),
		"ORIGIN_FETCH":      strconv.Itoa(int(cache.FromFetch)),
		"ORIGIN_SET":        strconv.Itoa(int(cache.FromSet)),
		"ORIGIN_CALLBACK":   strconv.Itoa(int(cache.FromCallback)),
		"ORIGIN_INVALIDATE": strconv.Itoa(int(cache.FromInvalidate)),
		"NEG_FIELD":         lua(negField),
		"MARKER_STD":        lua(cache.MarkerStandard),
		"MARKER_CUSTOM":     lua(cache.MarkerCustom),
		"STD_FIELD_LEN":     strconv.Itoa(len(fieldOf(im.StandardTags[0]))),
		"MODE_RELEASE":      lua(writeRelease),
		"MODE_EXISTING":     lua(writeExisting),
	}
	got, body := luaLayout(t, writeLua)
	body = regexp.MustCompile(`--.*`).ReplaceAllString(body, "") // comments may name numbers
	if !maps.Equal(got, want) {
		t.Fatalf("write.lua's layout\n%v\nGo's\n%v", got, want)
	}
	derived := map[string]string{"FIELD_HEAD + 1": strconv.Itoa(fieldHead + 1), "EVENT_AT - 1": strconv.Itoa(fieldEvent)}
	for name, v := range merged(want, derived) {
		if n, err := strconv.Atoi(v); err == nil && n <= 5 {
			continue // small numbers are loop bounds and indexes too
		}
		if regexp.MustCompile(`(^|[^\w'])` + regexp.QuoteMeta(v) + `($|[^\w'])`).MatchString(body) {
			t.Errorf("write.lua spells %s (%s) out instead of naming it", name, v)
		}
	}

	// The Go side of the same facts: the field names the script classifies
	// by length, and where encodeTag and encodeNeg put what.
	for _, tag := range im.StandardTags {
		if len(fieldOf(tag)) != len(fieldOf(im.StandardTags[0])) {
			t.Fatalf("standard fields of different lengths: %q", fieldOf(tag))
		}
	}
	if f := fieldOf(customTag); len(f) == len(fieldOf(nick)) || f == cache.MarkerStandard || f == cache.MarkerCustom || f == negField {
		t.Fatalf("custom field %q is classified as standard or as an entry", f)
	}
	v := cache.TagValue{Set: true, Origin: cache.FromCallback, Ver: 0x0102030405, Event: 0x0a0b0c0d0e, Fresh: time.UnixMilli(1), Stale: time.UnixMilli(2)}
	b := encodeTag(nil, v)
	if b[0] != byte(v.Origin)<<originShift|1 || be48(b[fieldVer:fieldVer+verLen]) != v.Ver ||
		be48(b[fieldEvent:fieldEvent+verLen]) != v.Event || fieldHead != fieldEvent+verLen || b[fieldHead] != 1 {
		t.Fatalf("encodeTag's layout is not codec.go's constants: % x", b)
	}
	neg := encodeNeg(nil, &cache.Record{NotFoundCode: 40003, NotFoundVer: 0x0102030405})
	if be48(neg[negVer:negVer+verLen]) != 0x0102030405 {
		t.Fatalf("encodeNeg's layout is not codec.go's constants: % x", neg)
	}
}

func merged(a, b map[string]string) map[string]string {
	m := maps.Clone(a)
	maps.Copy(m, b)
	return m
}

// TestWriteScriptArguments: the names write.lua gives its KEYS and ARGV
// are where writeArgs puts them.
func TestWriteScriptArguments(t *testing.T) {
	rec := &cache.Record{NotFoundCode: 40003, NotFoundVer: 7, Tags: []cache.TagValue{{Tag: nick, Origin: cache.FromSet, Ver: 9}}}
	a := writeArgs{hash: "H", claim: "C", keyTTLMs: 1234, skewMs: 567, mode: writeRelease, rec: rec}
	keys, argv := a.keys(), a.argv()
	want := map[string]any{
		"KEYS hash_key": "H", "KEYS claim_key": "C",
		"ARGV key_ttl_ms": int64(1234), "ARGV skew": int64(567), "ARGV neg": string(encodeNeg(nil, rec)), "ARGV mode": writeRelease,
	}
	re := regexp.MustCompile(`(?m)^local (\w+) = (?:tonumber\()?(KEYS|ARGV)\[(\d+)\]`)
	named := 0
	for _, m := range re.FindAllStringSubmatch(writeLua, -1) {
		i, _ := strconv.Atoi(m[3])
		var got any
		if m[2] == "KEYS" {
			got = keys[i-1]
		} else {
			got = argv[i-1]
		}
		if w, ok := want[m[2]+" "+m[1]]; !ok || got != w {
			t.Errorf("write.lua's %s[%d] is %s: writeArgs puts %q there, want %q", m[2], i, m[1], got, w)
		}
		named++
	}
	if named != len(want) {
		t.Fatalf("write.lua names %d keys and arguments, want %d", named, len(want))
	}
	first, _, _ := strings.Cut(strings.SplitN(writeLua, "local FIRST_PAIR = ", 2)[1], " ")
	if n, _ := strconv.Atoi(first); n != len(want)-len(keys)+1 || argv[n-1] != fieldOf(nick) {
		t.Fatalf("write.lua's field/value pairs start at ARGV[%s]; writeArgs puts them after %d arguments", first, len(argv)-2)
	}
}
