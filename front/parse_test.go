package front

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
)

const testPath = "/v4/profile/portrait_get"

func req(lines ...string) []byte {
	return []byte(strings.Join(lines, "\r\n"))
}

func TestParseHead(t *testing.T) {
	const body = `{"To_Account":["a"]}`
	ok := func(extra ...string) []byte {
		l := append([]string{"POST " + testPath + "?sdkappid=1&usersig=x HTTP/1.1", "Host: proxy:8080", "Content-Length: 20"}, extra...)
		return req(append(l, "", body)...)
	}
	tests := []struct {
		name   string
		in     []byte
		want   verdict
		reason string
	}{
		{"plain", ok(), serve, ""},
		{"keep-alive and close", ok("Connection: keep-alive, close"), serve, ""},
		{"other headers", ok("User-Agent: Go-http-client/1.1", "Accept-Encoding: gzip", "X-Odd: \tv a l\t"), serve, ""},
		{"no query", req("POST "+testPath+" HTTP/1.1", "Host: h", "", ""), serve, ""},
		{"incomplete head", []byte("POST " + testPath + " HTTP/1.1\r\nHost: h\r\n"), needMore, ""},
		{"incomplete line", []byte("POST " + testPath), needMore, ""},
		{"GET", req("GET "+testPath+" HTTP/1.1", "Host: h", "", ""), handOff, ReasonOtherRequest},
		{"another API", req("POST /v4/openim/sendmsg HTTP/1.1", "Host: h", "", ""), handOff, ReasonOtherRequest},
		{"longer path", req("POST "+testPath+"x HTTP/1.1", "Host: h", "", ""), handOff, ReasonOtherRequest},
		{"path with slash", req("POST "+testPath+"/ HTTP/1.1", "Host: h", "", ""), handOff, ReasonOtherRequest},
		{"HTTP/1.0", req("POST "+testPath+" HTTP/1.0", "Host: h", "", ""), handOff, ReasonHTTPFeature},
		{"bare LF", []byte("POST " + testPath + " HTTP/1.1\nHost: h\n\n"), handOff, ReasonHTTPFeature},
		{"bare LF in a header", []byte("POST " + testPath + " HTTP/1.1\r\nHost: h\nX: y\r\n\r\n"), handOff, ReasonHTTPFeature},
		{"chunked", ok("Transfer-Encoding: chunked"), handOff, ReasonHTTPFeature},
		{"expect", ok("Expect: 100-continue"), handOff, ReasonHTTPFeature},
		{"upgrade", ok("Upgrade: h2c"), handOff, ReasonHTTPFeature},
		{"connection upgrade", ok("Connection: Upgrade"), handOff, ReasonHTTPFeature},
		{"folded", ok("X-A: b", " c"), handOff, ReasonHTTPFeature},
		{"two lengths", ok("Content-Length: 20"), handOff, ReasonMalformed},
		{"signed length", req("POST "+testPath+" HTTP/1.1", "Host: h", "Content-Length: +20", "", body), handOff, ReasonMalformed},
		{"empty length", req("POST "+testPath+" HTTP/1.1", "Host: h", "Content-Length:", "", body), handOff, ReasonMalformed},
		{"huge length", req("POST "+testPath+" HTTP/1.1", "Host: h", "Content-Length: 99999999999999999999", "", body), handOff, ReasonMalformed},
		{"body over the limit", req("POST "+testPath+" HTTP/1.1", "Host: h", "Content-Length: 1025", "", body), handOff, ReasonLimit},
		{"no host", req("POST "+testPath+" HTTP/1.1", "Content-Length: 20", "", body), handOff, ReasonMalformed},
		{"two hosts", ok("Host: other"), handOff, ReasonMalformed},
		{"odd host", req("POST "+testPath+" HTTP/1.1", "Host: a b", "", ""), handOff, ReasonMalformed},
		{"space before colon", ok("X-A : b"), handOff, ReasonMalformed},
		{"no colon", ok("X-A"), handOff, ReasonMalformed},
		{"control byte", ok("X-A: b\x01"), handOff, ReasonMalformed},
		{"fragment", req("POST "+testPath+"?a#b HTTP/1.1", "Host: h", "", ""), handOff, ReasonMalformed},
		{"non-ASCII target", req("POST "+testPath+"?a=\xff HTTP/1.1", "Host: h", "", ""), handOff, ReasonMalformed},
		{"two spaces", req("POST  "+testPath+" HTTP/1.1", "Host: h", "", ""), handOff, ReasonOtherRequest},
		{"head over the limit", ok("X-Big: " + strings.Repeat("a", 2000)), handOff, ReasonLimit},
		{"incomplete head over the limit", []byte("POST " + testPath + " HTTP/1.1\r\nX: " + strings.Repeat("a", 2000)), handOff, ReasonLimit},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, v, why := parseHead(tc.in, testPath, 1024, 1024)
			if v != tc.want || why != tc.reason {
				t.Fatalf("verdict %d %q, want %d %q", v, why, tc.want, tc.reason)
			}
			if v == serve && h.size > len(tc.in) {
				t.Fatalf("head size %d past the input", h.size)
			}
		})
	}
	h, _, _ := parseHead(ok("Connection: close"), testPath, 1024, 1024)
	in := ok("Connection: close")
	if got := string(in[h.queryAt : h.queryAt+h.query]); got != "sdkappid=1&usersig=x" || h.bodyLen != 20 || !h.close ||
		string(in[h.size:h.size+h.bodyLen]) != body {
		t.Fatalf("query %q, body %d, close %v", got, h.bodyLen, h.close)
	}
}

// netHTTPReads is what net/http reads of a request: ok is false when its
// server would refuse it.
func netHTTPReads(b []byte) (method, path, rawPath, query, body string, close, ok bool) {
	r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
	if err != nil {
		return
	}
	// The server refuses these after ReadRequest (net/http's readRequest).
	if hosts := r.Header.Values("Host"); len(hosts) > 1 || r.Host == "" || len(r.TransferEncoding) > 0 {
		return
	}
	raw, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	return r.Method, r.URL.Path, r.URL.RawPath, r.URL.RawQuery, string(raw), r.Close, true
}

// agree checks that whenever parseHead serves b, net/http reads the same
// request from it.
func agree(t *testing.T, b []byte) {
	t.Helper()
	h, v, _ := parseHead(b, testPath, 4096, 1<<20)
	if v != serve || len(b) < h.size+h.bodyLen {
		return
	}
	method, path, rawPath, query, body, closing, ok := netHTTPReads(b[:h.size+h.bodyLen])
	switch {
	case !ok:
		t.Fatalf("served a request net/http refuses: %q", b)
	case method != "POST" || path != testPath || rawPath != "":
		t.Fatalf("net/http reads %s %s (raw %q): %q", method, path, rawPath, b)
	case query != string(b[h.queryAt:h.queryAt+h.query]):
		t.Fatalf("query %q, net/http %q: %q", b[h.queryAt:h.queryAt+h.query], query, b)
	case body != string(b[h.size:h.size+h.bodyLen]):
		t.Fatalf("body %q, net/http %q: %q", b[h.size:h.size+h.bodyLen], body, b)
	case closing != h.close:
		t.Fatalf("close %v, net/http %v: %q", h.close, closing, b)
	}
}

// TestParseAgreesWithNetHTTP mutates well-formed lookups at random (the
// bytes that frame a request: line ends, header names and values,
// lengths, the target) and checks that every one the front serves is
// read the same by net/http, and that the common ones are served.
func TestParseAgreesWithNetHTTP(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	served := 0
	for i := range 20000 {
		b := mutate(rng, sample(rng))
		agree(t, b)
		if _, v, _ := parseHead(b, testPath, 4096, 1<<20); v == serve {
			served++
		}
		if i < 100 { // unmutated samples are all served
			s := sample(rng)
			if _, v, why := parseHead(s, testPath, 4096, 1<<20); v != serve {
				t.Fatalf("a plain lookup is not served (%s): %q", why, s)
			}
			agree(t, s)
		}
	}
	if served < 2000 {
		t.Fatalf("only %d of 20000 mutated requests served: the mutations test nothing", served)
	}
}

var sampleHeaders = []string{"User-Agent: Go-http-client/1.1", "Accept-Encoding: gzip", "Content-Type: application/json",
	"Connection: keep-alive", "Connection: close", "X-Request-Id: 7f3a", "Accept: */*"}

func sample(rng *rand.Rand) []byte {
	body := fmt.Sprintf(`{"To_Account":["user%d"],"TagList":["Tag_Profile_IM_Nick"]}`, rng.IntN(1000))
	lines := []string{fmt.Sprintf("POST %s?sdkappid=1400000000&identifier=administrator&usersig=eJw%d&random=%d&contenttype=json HTTP/1.1",
		testPath, rng.IntN(1e6), rng.Uint32()), "Host: 127.0.0.1:8080"}
	for _, h := range sampleHeaders {
		if rng.IntN(2) == 0 {
			lines = append(lines, h)
		}
	}
	lines = append(lines, fmt.Sprintf("Content-Length: %d", len(body)))
	rng.Shuffle(len(lines)-1, func(i, j int) { lines[i+1], lines[j+1] = lines[j+1], lines[i+1] })
	return []byte(strings.Join(lines, "\r\n") + "\r\n\r\n" + body)
}

// tricky are byte strings that change how a request is framed or read.
var tricky = []string{"\r\n", "\n", "\r", " ", "\t", ":", ",", "\x00", "\x7f", "\xff", "+", "-", "0", "9", "#", "?", "%", "%2F",
	"/", "..", "Transfer-Encoding: chunked\r\n", "Content-Length: 5\r\n", "Content-Length: 0\r\n", "Host: x\r\n",
	"Connection: close\r\n", "Expect: 100-continue\r\n", " HTTP/1.1", "HTTP/1.0", "POST ", "GET ", "\r\n\r\n", "Content-length",
	"content-LENGTH: 1\r\n", "Transfer-Encoding", "chunked", "identity", "A"}

func mutate(rng *rand.Rand, b []byte) []byte {
	for range 1 + rng.IntN(3) {
		i := rng.IntN(len(b) + 1)
		switch rng.IntN(4) {
		case 0: // insert
			b = append(b[:i:i], append([]byte(tricky[rng.IntN(len(tricky))]), b[i:]...)...)
		case 1: // delete a few bytes
			j := min(len(b), i+1+rng.IntN(3))
			b = append(b[:i:i], b[j:]...)
		case 2: // replace one byte
			if i < len(b) {
				b[i] = tricky[rng.IntN(len(tricky))][0]
			}
		case 3: // change case
			if i < len(b) {
				b[i] ^= 0x20
			}
		}
	}
	return b
}

// FuzzParseHead checks the same agreement on inputs the fuzzer finds:
// `go test -fuzz FuzzParseHead ./front`.
func FuzzParseHead(f *testing.F) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 20 {
		f.Add(sample(rng))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		agree(t, b)
		h, v, _ := parseHead(b, testPath, 4096, 1<<20)
		if v == serve && (h.size > len(b) || h.queryAt+h.query > h.size) {
			t.Fatalf("offsets past the head: %+v of %d bytes", h, len(b))
		}
	})
}
