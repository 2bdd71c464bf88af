package httpapi

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// The scanner in front of decode must never change what a body means:
// these tests run decode (encoding/json) and decodeGet on the same bodies
// and want the same accounts, tags and error envelope.

const diffMaxAccounts = 5 // small, so the account limit is exercised too

func diffHandler(t testing.TB) *Handler {
	t.Helper()
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Auth: AuthNone, MaxAccounts: diffMaxAccounts})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// checkSame compares decode and decodeGet on body; decodeGet runs twice,
// so a remembered tag list answers the second time.
func checkSame(t testing.TB, h *Handler, body []byte) {
	t.Helper()
	wantA, wantT, wantE := decode(body, diffMaxAccounts)
	for round := range 2 {
		var s getScan
		gotA, gotT, gotE := h.decodeGet(bytes.Clone(body), &s, nil)
		if !sameEnvelope(gotE, wantE) || !slices.Equal(gotA, wantA) || !slices.Equal(gotT, wantT) {
			t.Fatalf("body %q (round %d):\n got  %q %q %+v\n want %q %q %+v", body, round, gotA, gotT, gotE, wantA, wantT, wantE)
		}
	}
}

func sameEnvelope(a, b *im.GetResponse) bool {
	if a == nil || b == nil {
		return a == b
	}
	return string(a.AppendJSON(nil)) == string(b.AppendJSON(nil))
}

// adversarial bodies: each is read by the scanner or sent to decode, and
// must mean the same either way.
var adversarial = []string{
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	` { "To_Account" : [ "u1" , "u2" ] , "TagList" : [ "Tag_Profile_IM_Nick" ] } `,
	"\t{\n\"TagList\":[\"Tag_Profile_IM_Nick\"],\r\n\"To_Account\":[\"u1\"]}\n",
	`{"TagList":["Tag_Profile_IM_Nick"],"To_Account":["u1"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick","Tag_Profile_IM_Nick","Tag_Profile_Custom_Ab"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"],"Extra":1}`,
	`{"to_account":["u1"],"taglist":["Tag_Profile_IM_Nick"]}`,
	`{"TO_ACCOUNT":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"To_Account":["u2"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1","u2"],"To_Account":[null],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"],"TagList":[null]}`,
	`{"To_Account":["u1"],"to_account":["u2"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":null,"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":null}`,
	`{"To_Account":[null],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1",null],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":[1],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":[1.5e3],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":[5]}`,
	`{"To_Account":["u1"],"TagList":[true]}`,
	`{"To_Account":[],"TagList":[]}`,
	`{"To_Account":["u1"],"TagList":[]}`,
	`{"To_Account":["u1"]}`,
	`{"TagList":["Tag_Profile_IM_Nick"]}`,
	`{}`,
	` {} `,
	`{"To_Account":["u1","u2","u3","u4","u5","u6"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1","u2","u3","u4","u5","u6"],"TagList":["bad"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Bogus"]}`,
	`{"To_Account":["u\u0031"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u\"1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u\/1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["é"],"TagList":["Tag_Profile_IM_Nick"]}`,
	"{\"To_Account\":[\"\xff\"],\"TagList\":[\"Tag_Profile_IM_Nick\"]}",
	"{\"To_Account\":[\"a\x01\"],\"TagList\":[\"Tag_Profile_IM_Nick\"]}",
	"{\"To_Account\":[\"a\x7f\"],\"TagList\":[\"Tag_Profile_IM_Nick\"]}",
	`{"To_Account":["u1"],"TagList":["Tag_Profile_Custom_\u0041b"]}`,
	`{"To_\u0041ccount":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}x`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}{}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"],}`,
	`{"To_Account":["u1",],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"] "TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1" "u2"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]`,
	`{"To_Account":["u1`,
	`{"To_Account"`,
	`{"To_Account":`,
	`{"To_Account":[`,
	`{`,
	``,
	` `,
	`null`,
	`[]`,
	`"x"`,
	`{"To_Account":"u1","TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":{"a":1},"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":[["u1"]],"TagList":{"a":1}}`,
	"\f{\"To_Account\":[\"u1\"],\"TagList\":[\"Tag_Profile_IM_Nick\"]}",
	"\xef\xbb\xbf{\"To_Account\":[\"u1\"],\"TagList\":[\"Tag_Profile_IM_Nick\"]}",
	`{"To_Account":[""],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["` + strings.Repeat("a", 33) + `"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":[` + strings.Repeat(`"Tag_Profile_IM_Nick",`, im.MaxTagsPerCall) + `"Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":[` + strings.Repeat(`"Tag_Profile_IM_Nick",`, im.MaxTagsPerCall-1) + `"Tag_Profile_IM_Nick"]}`,
	`{"":1,"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"]}`,
	`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"],"To_Account":1}`,
}

// fuzzCorpus reads FuzzPortraitGet's stored inputs.
func fuzzCorpus(t testing.TB) [][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/fuzz/FuzzPortraitGet/*")
	if err != nil || len(files) == 0 {
		t.Fatalf("no fuzz corpus: %v", err)
	}
	var out [][]byte
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(raw), "\n") {
			lit, ok := strings.CutPrefix(line, "string(")
			if !ok {
				continue
			}
			s, err := strconv.Unquote(strings.TrimSuffix(lit, ")"))
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			out = append(out, []byte(s))
		}
	}
	return out
}

func TestDecodeGetMatchesEncodingJSON(t *testing.T) {
	h := diffHandler(t)
	for _, b := range adversarial {
		checkSame(t, h, []byte(b))
	}
	for _, b := range fuzzCorpus(t) {
		checkSame(t, h, b)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	n := 20000
	if testing.Short() {
		n = 2000
	}
	for range n {
		checkSame(t, h, randomBody(rng))
	}
}

// TestScannerTakesCommonBodies guards the point of the scanner: the
// bodies callers send are read without encoding/json.
func TestScannerTakesCommonBodies(t *testing.T) {
	for _, b := range adversarial[:5] {
		var s getScan
		if !s.scan([]byte(b)) {
			t.Errorf("scanner refused %s", b)
		}
	}
	for _, b := range []string{`{"To_Account":["u1"],"TagList":["Tag_Profile_IM_Nick"],"Extra":1}`, `{"To_Account":[null]}`, `{"To_Account":["\u0031"]}`} {
		var s getScan
		if s.scan([]byte(b)) {
			t.Errorf("scanner took %s, which is for encoding/json", b)
		}
	}
}

func FuzzDecodeGet(f *testing.F) {
	for _, b := range adversarial {
		f.Add([]byte(b))
	}
	for _, b := range fuzzCorpus(f) {
		f.Add(b)
	}
	h := diffHandler(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		checkSame(t, h, body)
	})
}

// randomBody builds bodies near the common shape: the right keys and
// others, other spellings, repeats, nulls, numbers, escapes, odd bytes and
// whitespace, sometimes cut short or with one byte changed.
func randomBody(rng *rand.Rand) []byte {
	var b []byte
	ws := func() { b = randomSpace(rng, b) }
	ws()
	b = append(b, '{')
	// Mostly the two keys once each, in either order; else any keys.
	keys := []string{`"To_Account"`, `"TagList"`}
	if rng.IntN(2) == 0 {
		keys[0], keys[1] = keys[1], keys[0]
	}
	if rng.IntN(3) == 0 {
		others := []string{`"To_Account"`, `"TagList"`, `"To_Account"`, `"TagList"`, `"to_account"`, `"TAGLIST"`, `"X"`, `"To_\u0041ccount"`, `""`}
		keys = keys[:0]
		for range rng.IntN(4) {
			keys = append(keys, others[rng.IntN(len(others))])
		}
	}
	for m, key := range keys {
		if m > 0 {
			b = append(b, ',')
		}
		ws()
		b = append(b, key...)
		ws()
		b = append(b, ':')
		ws()
		b = randomValue(rng, b, key == `"TagList"`)
		ws()
	}
	if rng.IntN(20) == 0 {
		b = append(b, ',')
	}
	b = append(b, '}')
	ws()
	if rng.IntN(30) == 0 {
		b = append(b, "x"...)
	}
	switch rng.IntN(20) {
	case 0:
		b = b[:rng.IntN(len(b)+1)]
	case 1:
		if len(b) > 0 {
			b[rng.IntN(len(b))] = byte(rng.IntN(256))
		}
	}
	return b
}

func randomSpace(rng *rand.Rand, b []byte) []byte {
	for rng.IntN(3) == 0 {
		b = append(b, " \t\n\r"[rng.IntN(4)])
	}
	if rng.IntN(300) == 0 {
		b = append(b, '\f') // not JSON whitespace
	}
	return b
}

func randomValue(rng *rand.Rand, b []byte, tags bool) []byte {
	switch rng.IntN(30) {
	case 0:
		return append(b, "null"...)
	case 1:
		return append(b, `"u1"`...)
	case 2:
		return append(b, `{"a":[1]}`...)
	}
	b = append(b, '[')
	b = randomSpace(rng, b)
	for e := range 1 + rng.IntN(diffMaxAccounts+1) {
		if e > 0 {
			b = append(b, ',')
		}
		b = randomSpace(rng, b)
		b = randomElement(rng, b, tags)
		b = randomSpace(rng, b)
	}
	return append(b, ']')
}

func randomElement(rng *rand.Rand, b []byte, tags bool) []byte {
	accounts := []string{"u1", "u2", "user 3", "", strings.Repeat("a", 33), "a~!@#$%^&*()<>", "Tag_Profile_IM_Nick"}
	tagNames := []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Level", "Tag_Profile_Custom_Ab", "Tag_Profile_IM_Nick"}
	if rng.IntN(10) == 0 {
		tagNames = []string{"Tag_Profile_IM_Bogus", "u1", "Tag_Profile_Custom_A1"}
	}
	odd := []string{`null`, `1`, `-0.5e1`, `true`, `[]`, `{}`, `"u\u0031"`, `"\"q"`, `"a\\b"`, `"\/"`, `"\ud800"`, `"é"`,
		"\"\xff\"", "\"a\x01\"", "\"a\x7f\"", "\"a\tb\"", `"Tag_Profile_Custom_\u0041b"`, `"unterminated`}
	switch {
	case rng.IntN(10) == 0:
		return append(b, odd[rng.IntN(len(odd))]...)
	case tags:
		return strconv.AppendQuote(b, tagNames[rng.IntN(len(tagNames))])
	default:
		return strconv.AppendQuote(b, accounts[rng.IntN(len(accounts))])
	}
}
