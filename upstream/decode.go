package upstream

import (
	"encoding/json"
	"strconv"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// decodeGet decodes a portrait_get answer into out (zero on entry). The
// answer of a 100-account call is most of a cold lookup's decoding, and
// encoding/json's reflection costs several times a direct reading of its
// fixed shape. So the shape the upstream sends is read directly: known
// keys spelled exactly, once each; strings of printable ASCII without
// escapes; integers; values (Value) checked to be JSON and copied as they
// are. Anything else — an unknown, misspelled or repeated key, an escape, a
// non-ASCII string, a null, invalid JSON — is left to encoding/json, so
// the result, or the error, is always exactly encoding/json's.
func decodeGet(raw []byte, out *im.GetResponse) error {
	p := reader{b: raw}
	var fast im.GetResponse
	if p.response(&fast) {
		*out = fast
		return nil
	}
	return json.Unmarshal(raw, out)
}

// reader reads JSON from b at i; every method reports false on anything
// outside the shape decodeGet reads directly.
type reader struct {
	b []byte
	i int
}

func (p *reader) space() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// next skips white space and consumes c if it comes next.
func (p *reader) next(c byte) bool {
	p.space()
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

// str reads a string of printable ASCII without escapes.
func (p *reader) str() ([]byte, bool) {
	if !p.next('"') {
		return nil, false
	}
	start := p.i
	for ; p.i < len(p.b); p.i++ {
		switch c := p.b[p.i]; {
		case c == '"':
			p.i++
			return p.b[start : p.i-1], true
		case c == '\\' || c < 0x20 || c >= 0x80:
			return nil, false
		}
	}
	return nil, false
}

func (p *reader) string() (string, bool) {
	s, ok := p.str()
	return string(s), ok
}

// int reads an integer (no fraction, no exponent) that fits an int.
func (p *reader) int() (int, bool) {
	p.space()
	start := p.i
	if p.i < len(p.b) && p.b[p.i] == '-' {
		p.i++
	}
	digits := p.i
	for p.i < len(p.b) && '0' <= p.b[p.i] && p.b[p.i] <= '9' {
		p.i++
	}
	if p.i == digits || (p.b[digits] == '0' && p.i-digits > 1) {
		return 0, false
	}
	if p.i < len(p.b) && (p.b[p.i] == '.' || p.b[p.i] == 'e' || p.b[p.i] == 'E') {
		return 0, false
	}
	n, err := strconv.Atoi(string(p.b[start:p.i]))
	return n, err == nil
}

// object reads an object, calling field for each key: it reads the value
// and returns the key's bit, so that a key given twice is refused (0: no
// check).
func (p *reader) object(field func(key []byte) (bit uint32, ok bool)) bool {
	if !p.next('{') {
		return false
	}
	if p.next('}') {
		return true
	}
	var seen uint32
	for {
		k, ok := p.str()
		if !ok || !p.next(':') {
			return false
		}
		bit, ok := field(k)
		if !ok || seen&bit != 0 {
			return false
		}
		seen |= bit
		if !p.next(',') {
			return p.next('}')
		}
	}
}

// array reads an array, calling elem for each element.
func (p *reader) array(elem func() bool) bool {
	if !p.next('[') {
		return false
	}
	if p.next(']') {
		return true
	}
	for {
		if !elem() {
			return false
		}
		if !p.next(',') {
			return p.next(']')
		}
	}
}

func (p *reader) strings() ([]string, bool) {
	out := []string{}
	ok := p.array(func() bool {
		s, ok := p.string()
		out = append(out, s)
		return ok
	})
	return out, ok
}

func (p *reader) response(r *im.GetResponse) bool {
	ok := p.object(func(k []byte) (uint32, bool) {
		switch string(k) {
		case "UserProfileItem":
			r.UserProfileItem = []im.UserProfile{}
			return 1, p.array(func() bool {
				r.UserProfileItem = append(r.UserProfileItem, im.UserProfile{})
				return p.profile(&r.UserProfileItem[len(r.UserProfileItem)-1])
			})
		case "Fail_Account":
			var ok bool
			r.FailAccount, ok = p.strings()
			return 2, ok
		case "Invalid_Account":
			var ok bool
			r.InvalidAccount, ok = p.strings()
			return 4, ok
		case "ActionStatus":
			var ok bool
			r.ActionStatus, ok = p.string()
			return 8, ok
		case "ErrorCode":
			var ok bool
			r.ErrorCode, ok = p.int()
			return 16, ok
		case "ErrorInfo":
			var ok bool
			r.ErrorInfo, ok = p.string()
			return 32, ok
		case "ErrorDisplay":
			var ok bool
			r.ErrorDisplay, ok = p.string()
			return 64, ok
		}
		return 0, false
	})
	p.space()
	return ok && p.i == len(p.b)
}

func (p *reader) profile(u *im.UserProfile) bool {
	return p.object(func(k []byte) (uint32, bool) {
		var ok bool
		switch string(k) {
		case "To_Account":
			u.ToAccount, ok = p.string()
			return 1, ok
		case "ProfileItem":
			u.ProfileItem = []im.ProfileItem{}
			return 2, p.array(func() bool {
				u.ProfileItem = append(u.ProfileItem, im.ProfileItem{})
				return p.item(&u.ProfileItem[len(u.ProfileItem)-1])
			})
		case "ResultCode":
			u.ResultCode, ok = p.int()
			return 4, ok
		case "ResultInfo":
			u.ResultInfo, ok = p.string()
			return 8, ok
		}
		return 0, false
	})
}

func (p *reader) item(it *im.ProfileItem) bool {
	return p.object(func(k []byte) (uint32, bool) {
		switch string(k) {
		case "Tag":
			var ok bool
			it.Tag, ok = p.string()
			return 1, ok
		case "Value":
			p.space()
			start := p.i
			// null is left to encoding/json, whose handling of it differs.
			if p.i >= len(p.b) || p.b[p.i] == 'n' || !p.value(0) {
				return 2, false
			}
			it.Value = append(json.RawMessage(nil), p.b[start:p.i]...)
			return 2, true
		}
		return 0, false
	})
}

// maxDepth bounds the nesting of a value read here; deeper ones are left
// to encoding/json.
const maxDepth = 32

// value checks and skips any JSON value.
func (p *reader) value(depth int) bool {
	p.space()
	if p.i >= len(p.b) || depth > maxDepth {
		return false
	}
	switch c := p.b[p.i]; {
	case c == '"':
		return p.anyString()
	case c == '{':
		return p.object(func([]byte) (uint32, bool) { return 0, p.value(depth + 1) })
	case c == '[':
		return p.array(func() bool { return p.value(depth + 1) })
	case c == 't':
		return p.literal("true")
	case c == 'f':
		return p.literal("false")
	case c == 'n':
		return p.literal("null")
	default:
		return p.number()
	}
}

func (p *reader) literal(s string) bool {
	if len(p.b)-p.i >= len(s) && string(p.b[p.i:p.i+len(s)]) == s {
		p.i += len(s)
		return true
	}
	return false
}

// anyString checks and skips a string, escapes and all bytes from 0x20 on
// included (as encoding/json accepts them).
func (p *reader) anyString() bool {
	p.i++ // the opening quote
	for p.i < len(p.b) {
		c := p.b[p.i]
		p.i++
		switch {
		case c == '"':
			return true
		case c < 0x20:
			return false
		case c == '\\':
			if p.i >= len(p.b) {
				return false
			}
			e := p.b[p.i]
			p.i++
			switch e {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if len(p.b)-p.i < 4 || !isHex(p.b[p.i]) || !isHex(p.b[p.i+1]) || !isHex(p.b[p.i+2]) || !isHex(p.b[p.i+3]) {
					return false
				}
				p.i += 4
			default:
				return false
			}
		}
	}
	return false
}

func isHex(c byte) bool { return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' }

// number checks and skips a number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
func (p *reader) number() bool {
	if p.i < len(p.b) && p.b[p.i] == '-' {
		p.i++
	}
	switch {
	case p.i < len(p.b) && p.b[p.i] == '0':
		p.i++
	case p.digits() == 0:
		return false
	}
	if p.i < len(p.b) && p.b[p.i] == '.' {
		p.i++
		if p.digits() == 0 {
			return false
		}
	}
	if p.i < len(p.b) && (p.b[p.i] == 'e' || p.b[p.i] == 'E') {
		p.i++
		if p.i < len(p.b) && (p.b[p.i] == '+' || p.b[p.i] == '-') {
			p.i++
		}
		if p.digits() == 0 {
			return false
		}
	}
	return true
}

func (p *reader) digits() int {
	start := p.i
	for p.i < len(p.b) && '0' <= p.b[p.i] && p.b[p.i] <= '9' {
		p.i++
	}
	return p.i - start
}
