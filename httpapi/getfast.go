package httpapi

import (
	"slices"
	"sync"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// The common portrait_get body is read by a purpose-built scanner instead
// of encoding/json: one object whose keys are exactly "To_Account" and
// "TagList", each at most once, each an array of plain strings (bytes
// 0x20-0x7e, no escapes), with JSON whitespace wherever JSON allows it. For
// such a body encoding/json yields exactly those strings, so the scanner
// decides nothing it could decide differently. Any other body (an escape,
// a non-ASCII byte, a null, a number, a duplicate or unknown key, another
// spelling of a key, a syntax error) is left to decode, so its answer
// stays what encoding/json makes of it.

// span is a half-open byte range of the body.
type span struct{ lo, hi int }

// getScan holds a scan's results.
type getScan struct {
	accounts []span // the To_Account strings, quotes excluded
	tags     []span // the TagList strings, quotes excluded
	tagList  span   // the TagList array, brackets included
}

// getScratch is what a portrait_get reuses from one request to the next:
// the body, the answer and the scan. It goes back to scratchPool once the
// answer is written (Write copies it); the body is done with once decoded
// (accounts and tags are copies).
type getScratch struct {
	body, out []byte
	scan      getScan
	accounts  []string
	// The answers of a request served from the in-process tier alone
	// (Lookup.Hits); their values are the records' own.
	answers []cache.Answer
	items   []im.ProfileItem
}

var scratchPool = sync.Pool{New: func() any {
	return &getScratch{body: make([]byte, 0, 1024), out: make([]byte, 0, 4096),
		scan:     getScan{accounts: make([]span, 0, 16), tags: make([]span, 0, 8)},
		accounts: make([]string, 0, 16), answers: make([]cache.Answer, 0, 16), items: make([]im.ProfileItem, 0, 32)}
}}

// Larger scratch is dropped rather than kept for the next request.
const (
	maxPooledSpans = 1024
	maxPooledBytes = 64 << 10
)

func putScratch(s *getScratch) {
	if cap(s.scan.accounts) <= maxPooledSpans && cap(s.scan.tags) <= maxPooledSpans && cap(s.accounts) <= maxPooledSpans &&
		cap(s.answers) <= maxPooledSpans && cap(s.items) <= maxPooledSpans &&
		cap(s.body) <= maxPooledBytes && cap(s.out) <= maxPooledBytes {
		// Nothing a request looked up stays reachable from the pool.
		clear(s.accounts[:cap(s.accounts)])
		clear(s.answers[:cap(s.answers)])
		clear(s.items[:cap(s.items)])
		s.body, s.out, s.accounts, s.answers, s.items = s.body[:0], s.out[:0], s.accounts[:0], s.answers[:0], s.items[:0]
		scratchPool.Put(s)
	}
}

// scan reads b in the common shape; false means b is not in it (and may
// still be valid JSON: decode will tell).
func (s *getScan) scan(b []byte) bool {
	s.accounts, s.tags, s.tagList = s.accounts[:0], s.tags[:0], span{}
	var haveAccounts, haveTags bool
	i := skipWS(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i = skipWS(b, i+1)
	if i < len(b) && b[i] == '}' {
		return skipWS(b, i+1) == len(b)
	}
	for {
		key, j, ok := plainString(b, i)
		if !ok {
			return false
		}
		i = skipWS(b, j)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		i = skipWS(b, i+1)
		switch string(b[key.lo:key.hi]) {
		case "To_Account":
			if haveAccounts {
				return false
			}
			haveAccounts = true
			s.accounts, i, ok = stringArray(b, i, s.accounts)
		case "TagList":
			if haveTags {
				return false
			}
			haveTags = true
			start := i
			s.tags, i, ok = stringArray(b, i, s.tags)
			s.tagList = span{start, i}
		default:
			return false
		}
		if !ok {
			return false
		}
		i = skipWS(b, i)
		if i >= len(b) {
			return false
		}
		if b[i] == '}' {
			return skipWS(b, i+1) == len(b)
		}
		if b[i] != ',' {
			return false
		}
		i = skipWS(b, i+1)
	}
}

func skipWS(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// plainString reads the string starting at b[i] (its opening quote); it
// fails on anything but bytes 0x20-0x7e other than '\\'. next is the
// index after the closing quote.
func plainString(b []byte, i int) (s span, next int, ok bool) {
	if i >= len(b) || b[i] != '"' {
		return span{}, i, false
	}
	for j := i + 1; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			return span{i + 1, j}, j + 1, true
		case c < 0x20 || c > 0x7e || c == '\\':
			return span{}, j, false
		}
	}
	return span{}, len(b), false
}

// stringArray reads the array of plain strings starting at b[i], appending
// their spans to dst; next is the index after the closing bracket.
func stringArray(b []byte, i int, dst []span) (out []span, next int, ok bool) {
	if i >= len(b) || b[i] != '[' {
		return dst, i, false
	}
	i = skipWS(b, i+1)
	if i < len(b) && b[i] == ']' {
		return dst, i + 1, true
	}
	for {
		s, j, ok := plainString(b, i)
		if !ok {
			return dst, j, false
		}
		dst = append(dst, s)
		i = skipWS(b, j)
		if i >= len(b) {
			return dst, i, false
		}
		switch b[i] {
		case ']':
			return dst, i + 1, true
		case ',':
			i = skipWS(b, i+1)
		default:
			return dst, i, false
		}
	}
}

// decodeGet is decode with the scanner in front: the same accounts, tags
// and error envelope for every body. The accounts are appended to dst.
func (h *Handler) decodeGet(raw []byte, s *getScan, dst []string) (accounts, tags []string, e *im.GetResponse) {
	if !s.scan(raw) {
		return decode(raw, h.cfg.MaxAccounts)
	}
	if e := checkAccounts(len(s.accounts), h.cfg.MaxAccounts); e != nil {
		return nil, nil, e
	}
	if tags, e = h.tagSets.get(raw, s); e != nil {
		return nil, nil, e
	}
	accounts = slices.Grow(dst[:0], len(s.accounts))
	for _, a := range s.accounts {
		accounts = append(accounts, string(raw[a.lo:a.hi]))
	}
	return accounts, tags, nil
}

// tagSets remembers the checked, deduplicated tag list of each TagList
// text seen, so the hit path neither copies nor checks tag names: callers
// send the same few lists over and over. The map is replaced, never
// changed (see snapMap: readers of a settled list take no lock, and a new
// text costs the same however many are held), and emptied when it holds
// tagSetsMax lists. The lists it hands out are shared: Lookup must not
// change them.
type tagSets struct {
	m snapMap[[]string]
}

const (
	tagSetsMax     = 256
	tagSetsMaxText = 2048 // longer TagList texts are not remembered
)

func (t *tagSets) get(raw []byte, s *getScan) ([]string, *im.GetResponse) {
	text := raw[s.tagList.lo:s.tagList.hi]
	if tags, ok := t.m.getBytes(text); ok {
		return tags, nil
	}
	tags := make([]string, len(s.tags))
	for i, sp := range s.tags {
		tags[i] = string(raw[sp.lo:sp.hi])
	}
	if len(tags) == 0 {
		tags = nil // as encoding/json leaves a missing TagList
	}
	if e := checkTags(tags); e != nil {
		return nil, e
	}
	tags = im.DedupTags(tags)
	if len(text) <= tagSetsMaxText {
		t.put(string(text), tags)
	}
	return tags, nil
}

func (t *tagSets) put(text string, tags []string) {
	t.m.put(text, tags[:len(tags):len(tags)])
}
