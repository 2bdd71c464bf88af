package front

import (
	"bytes"
)

// verdict is what the front does with the request at the head of a
// connection's buffer.
type verdict int

const (
	needMore verdict = iota // the head is not complete yet
	serve                   // the front answers it
	handOff                 // net/http serves the connection from this request on
)

// Hand-off reasons, the values of http_handoffs_total's label.
const (
	ReasonOtherRequest = "other_request" // another path or method: forwarded calls, portrait_set, callbacks
	ReasonHTTPFeature  = "http_feature"  // HTTP/1.0, chunked, Expect, Upgrade, folded headers, bare LF, ...
	ReasonLimit        = "limit"         // a head or body over the limits: net/http answers it
	ReasonMalformed    = "malformed"     // anything net/http may read otherwise: it answers
	ReasonH2           = "h2"            // TLS with HTTP/2 negotiated
	ReasonTLSError     = "tls_error"     // a failed handshake: net/http reports it
)

// Reasons lists every hand-off reason.
var Reasons = []string{ReasonOtherRequest, ReasonHTTPFeature, ReasonLimit, ReasonMalformed, ReasonH2, ReasonTLSError}

// head is what the front needs of a request it serves: offsets into the
// bytes parseHead was given.
type head struct {
	size           int // request line and headers, with the blank line
	queryAt, query int // the raw query is b[queryAt:queryAt+query]
	bodyLen        int
	close          bool // Connection: close
}

// parseHead reads the request at the start of b. It answers serve only
// for a subset of HTTP/1.1 that net/http reads the same way: "POST path"
// or "POST path?query", HTTP/1.1, CRLF line ends, exactly one Host, at
// most one Content-Length of plain digits, no Transfer-Encoding, Expect
// or Upgrade, Connection only keep-alive or close, header names that are
// tokens and values without control bytes, within maxHead bytes and a
// body within maxBody. Everything else is handed to net/http, which then
// reads the same bytes from the request's first one: the front never
// answers a request net/http would frame or refuse differently, so the
// two can never disagree on where a request ends.
func parseHead(b []byte, path string, maxHead int, maxBody int64) (head, verdict, string) {
	var p headParse
	return p.parse(b, path, maxHead, maxBody)
}

// headParse is parseHead resumed as a head arrives: the lines of it read
// so far are not read again, so a head sent a line at a time costs its
// length, not its length squared (64 KiB sent in 5-byte lines would
// otherwise be parsed 13,000 times over).
type headParse struct {
	h            head
	at           int  // b[:at] is whole lines, read (0: none)
	host, length bool // seen so far
}

// parse is parseHead of b, which starts with the bytes p was given
// before; needMore leaves p ready for more of them.
func (p *headParse) parse(b []byte, path string, maxHead int, maxBody int64) (head, verdict, string) {
	limited := len(b) > maxHead
	if limited {
		b = b[:maxHead]
	}
	if p.at == 0 {
		line, rest, end := cutLine(b)
		if end != lineOK {
			v, why := more(limited, end)
			return p.h, v, why
		}
		if v, why := requestLine(line, path, &p.h); v != serve {
			return p.h, v, why
		}
		p.at = len(b) - len(rest)
	}
	for {
		line, rest, end := cutLine(b[p.at:])
		if end != lineOK {
			v, why := more(limited, end)
			return p.h, v, why
		}
		p.at = len(b) - len(rest)
		if len(line) == 0 {
			break
		}
		if v, why := p.h.header(line, &p.host, &p.length, maxBody); v != serve {
			return p.h, v, why
		}
	}
	if !p.host {
		return p.h, handOff, ReasonMalformed
	}
	p.h.size = p.at
	return p.h, serve, ""
}

// lineEnd says how cutLine found a line.
type lineEnd int

const (
	lineOK         lineEnd = iota // ended by CRLF
	lineIncomplete                // no LF yet
	lineBareLF                    // ended by an LF alone, which net/http also reads
)

// more is the verdict on a head cut short by end: wait for the rest, or
// hand it off when it holds a bare LF or is already over the head limit
// (net/http answers 431).
func more(limited bool, end lineEnd) (verdict, string) {
	switch {
	case end == lineBareLF:
		return handOff, ReasonHTTPFeature
	case limited:
		return handOff, ReasonLimit
	}
	return needMore, ""
}

// cutLine cuts b after its first line end.
func cutLine(b []byte) (line, rest []byte, end lineEnd) {
	i := bytes.IndexByte(b, '\n')
	switch {
	case i < 0:
		return nil, nil, lineIncomplete
	case i == 0 || b[i-1] != '\r':
		return nil, nil, lineBareLF
	}
	return b[: i-1 : i-1], b[i+1:], lineOK
}

const httpVersion = " HTTP/1.1"

// requestLine checks "POST <path>[?<query>] HTTP/1.1" and records the
// query's place.
func requestLine(line []byte, path string, h *head) (verdict, string) {
	if !bytes.HasPrefix(line, []byte("POST ")) {
		if bytes.HasSuffix(line, []byte(httpVersion)) {
			return handOff, ReasonOtherRequest
		}
		return handOff, ReasonHTTPFeature
	}
	if !bytes.HasSuffix(line, []byte(httpVersion)) || len(line) < len("POST ")+len(httpVersion) {
		return handOff, ReasonHTTPFeature // "POST HTTP/1.1" overlaps
	}
	target := line[len("POST ") : len(line)-len(httpVersion)]
	if !bytes.HasPrefix(target, []byte(path)) {
		return handOff, ReasonOtherRequest
	}
	for _, c := range target {
		// Visible ASCII only: no space, control byte, '#' or non-ASCII,
		// which net/http reads in ways this parser does not.
		if c <= ' ' || c >= 0x7f || c == '#' {
			return handOff, ReasonMalformed
		}
	}
	switch q := target[len(path):]; {
	case len(q) == 0:
		h.queryAt = len(line)
	case q[0] == '?':
		h.queryAt, h.query = len("POST ")+len(path)+1, len(q)-1
	default:
		return handOff, ReasonOtherRequest // a longer path
	}
	return serve, ""
}

// header checks one header line and records what the front needs of it.
func (h *head) header(line []byte, host, length *bool, maxBody int64) (verdict, string) {
	if line[0] == ' ' || line[0] == '\t' {
		return handOff, ReasonHTTPFeature // obsolete line folding
	}
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return handOff, ReasonMalformed
	}
	name, value := line[:colon], bytes.Trim(line[colon+1:], " \t")
	for _, c := range name {
		if !isToken(c) {
			return handOff, ReasonMalformed
		}
	}
	for _, c := range value {
		if c < ' ' && c != '\t' || c == 0x7f {
			return handOff, ReasonMalformed
		}
	}
	switch {
	case equalFold(name, "content-length"):
		if *length {
			return handOff, ReasonMalformed
		}
		*length = true
		n, ok := digits(value)
		if !ok {
			return handOff, ReasonMalformed
		}
		if n > maxBody {
			return handOff, ReasonLimit
		}
		h.bodyLen = int(n)
	case equalFold(name, "host"):
		if *host || !validHost(value) {
			return handOff, ReasonMalformed
		}
		*host = true
	case equalFold(name, "connection"):
		return h.connection(value)
	case equalFold(name, "transfer-encoding"), equalFold(name, "expect"), equalFold(name, "upgrade"):
		return handOff, ReasonHTTPFeature
	}
	return serve, ""
}

// connection reads a Connection header: keep-alive, close, or nothing
// else.
func (h *head) connection(value []byte) (verdict, string) {
	for len(value) > 0 {
		var tok []byte
		tok, value, _ = bytes.Cut(value, []byte(","))
		switch tok = bytes.Trim(tok, " \t"); {
		case equalFold(tok, "keep-alive"):
		case equalFold(tok, "close"):
			h.close = true
		default:
			return handOff, ReasonHTTPFeature
		}
	}
	return serve, ""
}

// digits reads a Content-Length: 1 to 18 decimal digits, nothing else.
func digits(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

// validHost accepts a host name or address with an optional port: a
// subset of what net/http accepts (no percent-escapes, userinfo or
// non-ASCII), which it hands off instead.
func validHost(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '.' || c == '-' || c == ':' || c == '[' || c == ']' || c == '_':
		default:
			return false
		}
	}
	return true
}

// isToken reports whether c may appear in a header name (RFC 9110 tchar).
func isToken(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}

// equalFold is ASCII case-insensitive equality of b and lower, which is
// lower case.
func equalFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}
