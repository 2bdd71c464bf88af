package httpapi

import (
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// authenticate checks the query as the upstream does: the app, the admin
// identifier and (in AuthUserSig mode) the UserSig.
func (h *Handler) authenticate(r *http.Request) *im.GetResponse {
	return h.verifyQuery(r, true)
}

// verifyQuery checks the query's app and (in AuthUserSig mode) UserSig,
// and with admin that the identifier is the proxy's admin. Without admin,
// any identifier with a valid UserSig for this app passes: a forwarded
// call's identifier is checked by the upstream (the app may have several
// admins).
func (h *Handler) verifyQuery(r *http.Request, admin bool) *im.GetResponse {
	return h.verifyQueryAt(r, admin, time.Time{})
}

// verifyQueryAt is verifyQuery with the time a UserSig is checked at; the
// zero time means h.cfg.Now(). A UserSig seen before is found without a
// copy: one sent %-escaped (as url.Values.Encode sends its '*') is
// unescaped into a buffer on the stack.
func (h *Handler) verifyQueryAt(r *http.Request, admin bool, now time.Time) *im.GetResponse {
	return h.verifyRawQuery(r.URL.RawQuery, admin, now)
}

// verifyRawQuery is verifyQueryAt on a raw query. It keeps nothing of
// raw (which may alias a connection's buffer): the UserSigs it remembers
// are copies.
func (h *Handler) verifyRawQuery(raw string, admin bool, now time.Time) *im.GetResponse {
	var sigBuf [512]byte
	q, sigBytes, e := parseAuthQuery(raw, sigBuf[:0])
	if e != nil {
		return e
	}
	if q.app == "" {
		if h.cfg.Auth == AuthNone {
			return nil
		}
		return fail(im.CodeSDKAppIDMissing, "sdkappid is missing")
	}
	if q.app != h.appID {
		if id, err := strconv.ParseUint(q.app, 10, 64); err != nil || id != h.cfg.SDKAppID {
			return fail(im.CodeSDKAppIDInvalid, "sdkappid is not this proxy's app")
		}
	}
	if h.cfg.Auth == AuthNone {
		return nil
	}
	if now.IsZero() {
		now = h.cfg.Now()
	}
	var known bool
	if sigBytes != nil {
		if known = h.sigs.knownBytes(sigBytes, q.identifier, now); !known {
			q.sig = string(sigBytes)
		}
	} else {
		known = h.sigs.known(q.sig, q.identifier, now)
	}
	if !known {
		if err := h.sigs.verify(q.sig, q.identifier, h.cfg.Key, h.cfg.SDKAppID, now); err != nil {
			return fail(usersig.Code(err), err.Error())
		}
	}
	if admin && q.identifier != h.cfg.Identifier {
		return fail(im.CodeNeedAdmin, "identifier is not the app admin")
	}
	return nil
}

// authQuery is what a query says of its caller.
type authQuery struct{ app, identifier, sig string }

// parseAuthQuery reads the auth parameters of a raw query as the upstream
// does, refusing what it may read otherwise: a ';', a malformed escape, a
// repeated auth parameter. An escaped UserSig is unescaped into sigBuf
// and returned as sigBytes instead of q.sig (apart, so that sigBuf can
// stay on the caller's stack: escape analysis does not tell fields apart).
func parseAuthQuery(raw string, sigBuf []byte) (q authQuery, sigBytes []byte, _ *im.GetResponse) {
	var seen [4]bool // sdkappid, identifier, usersig, contenttype
	semicolon := strings.IndexByte(raw, ';') >= 0
	for rest := raw; rest != ""; {
		var kv string
		kv, rest, _ = strings.Cut(rest, "&")
		if semicolon && strings.IndexByte(kv, ';') >= 0 {
			// url.ParseQuery refuses it; an upstream may split on it.
			return q, nil, fail(im.CodeHTTPParse, "query holds a ';'")
		}
		k, v, _ := strings.Cut(kv, "=")
		var err error
		if indexEscape(k) >= 0 {
			if k, err = url.QueryUnescape(k); err != nil {
				return q, nil, fail(im.CodeHTTPParse, "query is not well-formed")
			}
		}
		i := slices.Index(authParams[:], k)
		if indexEscape(v) >= 0 {
			ok := true
			switch i {
			case -1:
				ok = validEscapes(v)
			case 2:
				sigBytes, ok = unescapeQuery(sigBuf, v)
			default:
				v, err = url.QueryUnescape(v)
				ok = err == nil
			}
			if !ok {
				return q, nil, fail(im.CodeHTTPParse, "query is not well-formed")
			}
		}
		if i < 0 {
			continue
		}
		if seen[i] {
			// The upstream may read another copy than the one checked
			// here: a forged UserSig, or another app's sdkappid, behind a
			// valid one.
			return q, nil, fail(im.CodeHTTPParse, "query repeats "+k)
		}
		seen[i] = true
		switch i {
		case 0:
			q.app = v
		case 1:
			q.identifier = v
		case 2:
			q.sig = v
		}
	}
	return q, sigBytes, nil
}

// authParams are the query parameters the upstream authenticates and reads
// a call's format from; each may appear once.
var authParams = [...]string{"sdkappid", "identifier", "usersig", "contenttype"}

// unescapeQuery appends url.QueryUnescape(s) to dst; ok is false where
// QueryUnescape returns an error.
func unescapeQuery(dst []byte, s string) ([]byte, bool) {
	for {
		i := indexEscape(s)
		if i < 0 {
			return append(dst, s...), true
		}
		dst = append(dst, s[:i]...)
		if s[i] == '+' {
			dst = append(dst, ' ')
			s = s[i+1:]
			continue
		}
		if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
			return dst, false
		}
		dst = append(dst, unHex(s[i+1])<<4|unHex(s[i+2]))
		s = s[i+3:]
	}
}

// indexEscape returns the index of the first '%' or '+' in s, or -1.
func indexEscape(s string) int {
	pct := strings.IndexByte(s, '%')
	head := s
	if pct >= 0 {
		head = s[:pct]
	}
	if plus := strings.IndexByte(head, '+'); plus >= 0 {
		return plus
	}
	return pct
}

// validEscapes reports whether url.QueryUnescape(s) succeeds.
func validEscapes(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == '%' {
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return false
			}
			i += 2
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unHex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	default:
		return c - 'a' + 10
	}
}

// sigCache remembers verified sigs briefly, so the hit path does not pay an
// inflate and an HMAC per request. Entries last at most sigCacheTTL and never
// past the sig's expiry; all are forgotten when sigCacheMax are held. Lookups
// of a settled sig take no lock (see snapMap), and an insertion costs the
// same however many sigs are held, so callers sending fresh sigs (any end
// user can: a sig re-spelled with a newline decodes the same) slow no one.
type sigCache struct {
	m snapMap[verified]
}

type verified struct {
	identifier string
	until      time.Time
}

const (
	sigCacheTTL = 5 * time.Minute
	sigCacheMax = 4096
)

// known reports whether sig was verified for identifier and is still good.
func (c *sigCache) known(sig, identifier string, now time.Time) bool {
	v, ok := c.m.get(sig)
	return ok && v.identifier == identifier && now.Before(v.until)
}

// knownBytes is known for a sig held in bytes (the lookup copies nothing).
func (c *sigCache) knownBytes(sig []byte, identifier string, now time.Time) bool {
	v, ok := c.m.getBytes(sig)
	return ok && v.identifier == identifier && now.Before(v.until)
}

// verify checks sig and remembers it when it is good.
func (c *sigCache) verify(sig, identifier, key string, app uint64, now time.Time) error {
	claims, err := usersig.Verify(sig, key, app, identifier, now)
	if err != nil {
		return err
	}
	until := now.Add(sigCacheTTL)
	if claims.Expires.Before(until) {
		until = claims.Expires.Add(time.Second) // Verify accepts up to the expiry second inclusive
	}
	c.m.put(strings.Clone(sig), verified{strings.Clone(identifier), until})
	return nil
}
