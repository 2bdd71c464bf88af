// Package httpapi serves the drop-in v4/profile/portrait_get endpoint.
//
// A request is decoded, validated and authenticated exactly as the upstream
// would (same query, same JSON, same error envelope and codes), then
// answered from the cache path. Caller mistakes never reach the upstream:
// they get HTTP 200 with ActionStatus FAIL and the upstream's code. Accounts
// that are not valid ids are listed in Invalid_Account; per-account failures
// carry their ResultCode and are listed in Fail_Account.
//
// The Handler is safe for concurrent use.
package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Lookup answers accounts for tags; *cache.Cache satisfies it.
type Lookup interface {
	Get(ctx context.Context, accounts, tags []string) []cache.Answer
}

// TagChecker says whether a request's tags are known to be refused by the
// upstream (*badtags.Set satisfies it): code and info are the refusal.
type TagChecker interface {
	Check(tags []string) (code int, info string, refused bool)
}

// Auth modes.
const (
	AuthUserSig = "usersig" // callers present an admin UserSig for this app
	AuthNone    = "none"    // trusted network: no caller check
)

// Defaults of Config and ForwardConfig, exported for the flags that show
// them.
const (
	DefaultMaxAccounts          = 1000            // Config.MaxAccounts
	DefaultRequestTimeout       = 5 * time.Second // Config.RequestTimeout
	DefaultCallbackUnsignedRate = 100             // Config.CallbackUnsignedRate
	DefaultForwardMaxBody       = 1 << 20         // ForwardConfig.MaxBodyBytes
)

// Config configures a Handler. Lookup and SDKAppID are required, and Key
// unless Auth is AuthNone.
type Config struct {
	Lookup     Lookup
	SDKAppID   uint64
	Identifier string // the admin account callers must present; default im.DefaultAdministrator
	Key        string // the app's secret key, to verify callers' UserSigs
	Auth       string // AuthUserSig (default) or AuthNone
	// MaxBodyBytes caps a request body. Zero means 1 MiB.
	MaxBodyBytes int64
	// MaxAccounts caps accounts per request. Zero means DefaultMaxAccounts.
	MaxAccounts int
	// RequestTimeout bounds a request when the caller gives no sooner
	// deadline. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Setter and Changer, when both set, enable portrait_set through the
	// proxy (with AuthNone only if AuthNoneWrites says so); Changer and
	// CallbackPath enable the change-callback receiver, which needs either
	// CallbackToken (callbacks are checked against it and their values
	// applied) or CallbackUnsigned (nothing is checked: a callback only
	// drops tags already cached, at most CallbackUnsignedRate a second).
	Setter           Setter
	Changer          Changer
	AuthNoneWrites   bool
	CallbackPath     string
	CallbackToken    string
	CallbackUnsigned bool
	// CallbackUnsignedRate bounds unsigned callbacks per second (burst:
	// one second's worth); more are answered HTTP 429. Zero means
	// DefaultCallbackUnsignedRate.
	CallbackUnsignedRate float64
	// ClockSkew is how far the upstream's clock may be ahead of this
	// proxy's: a callback's EventTime beyond now + ClockSkew is refused.
	// Zero means cache.DefaultClockSkew, the bound the cache orders by.
	ClockSkew time.Duration
	// Tags, if set, answers a request naming a refused tag at once with
	// the upstream's code, before any lookup.
	Tags TagChecker
	// Forward, if set, forwards every other /v4/<service>/<command> to
	// the upstream unchanged (see forward.go); nil answers them 60002.
	Forward *ForwardConfig
	Metrics *metrics.Metrics
	Now     func() time.Time
}

// Handler serves the drop-in API. Create it with New.
type Handler struct {
	cfg Config
	m   *metrics.Metrics
	// counters of every request, resolved once
	requestsOK, lookupsFound prometheus.Counter
	sigs                     sigCache
	mux                      *http.ServeMux
	fwd                      *forwarder
	replays                  replayMemo
	unsigned                 *rate.Limiter // unsigned callbacks' bound
}

// New validates cfg and returns a Handler.
func New(cfg Config) (*Handler, error) {
	if cfg.Lookup == nil {
		return nil, errors.New("httpapi: Config.Lookup is required")
	}
	if cfg.SDKAppID == 0 {
		return nil, errors.New("httpapi: Config.SDKAppID is required")
	}
	switch cfg.Auth {
	case "":
		cfg.Auth = AuthUserSig
	case AuthUserSig, AuthNone:
	default:
		return nil, fmt.Errorf("httpapi: unknown auth mode %q (want %q or %q)", cfg.Auth, AuthUserSig, AuthNone)
	}
	if cfg.Auth == AuthUserSig && cfg.Key == "" {
		return nil, errors.New("httpapi: Config.Key is required to verify callers' UserSigs")
	}
	if cfg.Identifier == "" {
		cfg.Identifier = im.DefaultAdministrator
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = 1 << 20
	}
	if cfg.MaxAccounts <= 0 {
		cfg.MaxAccounts = DefaultMaxAccounts
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ClockSkew <= 0 {
		cfg.ClockSkew = cache.DefaultClockSkew
	}
	if cfg.CallbackUnsignedRate <= 0 {
		cfg.CallbackUnsignedRate = DefaultCallbackUnsignedRate
	}
	if cfg.Changer != nil && cfg.CallbackPath != "" && cfg.CallbackToken == "" && !cfg.CallbackUnsigned {
		return nil, errors.New("httpapi: a callback receiver needs CallbackToken, or CallbackUnsigned to accept callbacks nothing authenticates")
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(prometheus.NewRegistry())
	}
	h := &Handler{cfg: cfg, m: cfg.Metrics, sigs: sigCache{m: map[string]verified{}},
		requestsOK:   cfg.Metrics.Requests.WithLabelValues("ok"),
		lookupsFound: cfg.Metrics.Lookups.WithLabelValues(metrics.LookupFound),
		unsigned:     rate.NewLimiter(rate.Limit(cfg.CallbackUnsignedRate), max(1, int(cfg.CallbackUnsignedRate)))}
	h.mux = http.NewServeMux()
	h.mux.HandleFunc(im.PathGet, h.portraitGet)
	if cfg.Setter != nil && cfg.Changer != nil {
		h.mux.HandleFunc(im.PathSet, h.portraitSet)
	}
	if cfg.Changer != nil && cfg.CallbackPath != "" {
		if !strings.HasPrefix(cfg.CallbackPath, "/") || cfg.CallbackPath == im.PathGet || cfg.CallbackPath == im.PathSet {
			return nil, fmt.Errorf("httpapi: callback path %q must start with / and not be an API path", cfg.CallbackPath)
		}
		h.mux.HandleFunc(cfg.CallbackPath, h.callback)
	}
	if cfg.Forward != nil {
		fwd, err := newForwarder(h, *cfg.Forward)
		if err != nil {
			return nil, err
		}
		h.fwd = fwd
	}
	h.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if h.fwd != nil && strings.HasPrefix(r.URL.Path, "/v4/") {
			h.fwd.serve(w, r)
			return
		}
		h.noSuchAPI(w, r.URL.Path)
	})
	return h, nil
}

// noSuchAPI answers a path the proxy neither serves nor forwards: HTTP 404
// and 60002 (what the proxy answered before forwarding existed), or with
// forwarding on HTTP 200, the IM convention on API paths.
func (h *Handler) noSuchAPI(w http.ResponseWriter, path string) {
	status := http.StatusNotFound
	if h.fwd != nil && strings.HasPrefix(path, "/v4") {
		status = http.StatusOK
		h.m.Forwarded.WithLabelValues(metrics.ServiceOther, metrics.ForwardRejected).Inc()
	}
	h.write(w, status, &im.GetResponse{ActionStatus: im.StatusFail,
		ErrorCode: im.CodeHTTPParse, ErrorInfo: "no such API: " + strconv.Quote(path)})
}

// ServeHTTP routes on the canonical path: doubled slashes are one and a
// trailing slash is dropped, as the upstream's front reads them, so no
// caller is ever redirected (some clients do not follow a 307 for POST).
// A path with a "." or ".." segment is answered, never cleaned into
// another API.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p, ok := canonicalPath(r.URL.Path)
	if !ok {
		h.noSuchAPI(w, r.URL.Path)
		return
	}
	if p != r.URL.Path {
		u := *r.URL
		u.Path, u.RawPath = p, ""
		r2 := *r
		r2.URL = &u
		r = &r2
	}
	h.mux.ServeHTTP(w, r)
}

// canonicalPath collapses runs of slashes and drops a trailing one; ok is
// false for a path that is not absolute or has a "." or ".." segment.
func canonicalPath(p string) (string, bool) {
	if !strings.HasPrefix(p, "/") {
		return p, false
	}
	if !strings.Contains(p, "//") && !strings.Contains(p, "/.") && (len(p) == 1 || p[len(p)-1] != '/') {
		return p, true // the common case, without allocating
	}
	var b strings.Builder
	for _, seg := range strings.Split(p, "/") {
		switch seg {
		case "":
			continue
		case ".", "..":
			return p, false
		}
		b.WriteByte('/')
		b.WriteString(seg)
	}
	if b.Len() == 0 {
		return "/", true
	}
	return b.String(), true
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func (h *Handler) write(w http.ResponseWriter, status int, resp *im.GetResponse) {
	bp := bufPool.Get().(*[]byte)
	b := resp.AppendJSON((*bp)[:0])
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
	if cap(b) <= 1<<20 {
		*bp = b
		bufPool.Put(bp)
	}
}

func fail(code int, info string) *im.GetResponse {
	return &im.GetResponse{ActionStatus: im.StatusFail, ErrorCode: code, ErrorInfo: info}
}

// request is the body as the upstream reads it.
type request struct {
	ToAccount []string `json:"To_Account"`
	TagList   []string `json:"TagList"`
}

// rawRequest keeps elements raw, to say which field holds a wrong type.
type rawRequest struct {
	ToAccount []json.RawMessage `json:"To_Account"`
	TagList   []json.RawMessage `json:"TagList"`
}

// decode parses and checks a body, returning an error envelope for a
// caller mistake. The common case is one Unmarshal into strings; only a
// body that fails it is decoded again, raw, to find the upstream's code.
func decode(raw []byte, maxAccounts int) (accounts, tags []string, e *im.GetResponse) {
	var req request
	if err := json.Unmarshal(raw, &req); err != nil {
		var syntax *json.SyntaxError
		if errors.As(err, &syntax) || errors.Is(err, io.ErrUnexpectedEOF) || len(raw) == 0 {
			return nil, nil, fail(im.CodeJSONParse, "request body is not valid JSON")
		}
		var rr rawRequest
		if json.Unmarshal(raw, &rr) != nil {
			return nil, nil, fail(im.CodeBadRequest, "request body does not match {To_Account:[string],TagList:[string]}")
		}
		for _, a := range rr.ToAccount {
			var s string
			if json.Unmarshal(a, &s) != nil {
				return nil, nil, fail(im.CodeAccountType, "To_Account holds a value that is not a string")
			}
		}
		return nil, nil, fail(im.CodeBadRequest, "TagList holds a value that is not a string")
	}
	if len(req.ToAccount) == 0 {
		return nil, nil, fail(im.CodeNoAccount, "To_Account is missing or empty")
	}
	if len(req.ToAccount) > maxAccounts {
		return nil, nil, fail(im.CodeBadRequest, fmt.Sprintf("To_Account has %d accounts; this proxy serves at most %d per request", len(req.ToAccount), maxAccounts))
	}
	if len(req.TagList) == 0 {
		return nil, nil, fail(im.CodeBadRequest, "TagList is missing or empty")
	}
	if len(req.TagList) > im.MaxTagsPerCall {
		return nil, nil, fail(im.CodeBadRequest, fmt.Sprintf("TagList has %d entries; at most %d are accepted", len(req.TagList), im.MaxTagsPerCall))
	}
	for _, t := range req.TagList {
		if !im.ValidTag(t) {
			return nil, nil, fail(im.CodeInvalidTag, "invalid tag name: "+strconv.Quote(t))
		}
	}
	// Each tag is answered once, as the upstream does, however often it is
	// named. Repeated accounts are answered once per mention, in order.
	return req.ToAccount, im.DedupTags(req.TagList), nil
}

func (h *Handler) portraitGet(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	resp := h.serve(r)
	if resp.ErrorCode == 0 {
		h.requestsOK.Inc()
	} else {
		h.m.Requests.WithLabelValues(strconv.Itoa(resp.ErrorCode)).Inc()
	}
	h.write(w, http.StatusOK, resp)
	h.m.RequestDuration.Observe(time.Since(start).Seconds())
}

func (h *Handler) serve(r *http.Request) *im.GetResponse {
	if r.Method != http.MethodPost {
		return fail(im.CodeHTTPParse, "portrait_get takes POST, not "+r.Method)
	}
	if e := h.authenticate(r); e != nil {
		return e
	}
	raw, bad := h.readBody(r)
	if bad != nil {
		return fail(bad.ErrorCode, bad.ErrorInfo)
	}
	accounts, tags, e := decode(raw, h.cfg.MaxAccounts)
	if e != nil {
		return e
	}
	if h.cfg.Tags != nil {
		// The upstream refuses the whole call for such a tag: so do we,
		// without spending a call on it.
		if code, info, refused := h.cfg.Tags.Check(tags); refused {
			return fail(code, info)
		}
	}
	valid := make([]string, 0, len(accounts))
	var invalid []string
	for _, a := range accounts {
		if validAccount(a) {
			valid = append(valid, a)
		} else {
			invalid = append(invalid, a)
		}
	}

	ctx, cancel := context.WithTimeout(r.Context(), h.cfg.RequestTimeout)
	defer cancel()
	var answers []cache.Answer
	if len(valid) > 0 {
		answers = h.cfg.Lookup.Get(ctx, valid, tags)
	}
	return h.assemble(accounts, answers, invalid)
}

// assemble builds the answer in request order. When every account failed
// with the same error, the whole call fails with its code, as the upstream
// does for whole-call errors.
func (h *Handler) assemble(accounts []string, answers []cache.Answer, invalid []string) *im.GetResponse {
	resp := &im.GetResponse{ActionStatus: im.StatusOK, UserProfileItem: make([]im.UserProfile, 0, len(accounts)),
		FailAccount: []string{}, InvalidAccount: []string{}}
	if invalid != nil {
		resp.InvalidAccount = invalid
	}
	errCount, firstCode, sameCode, firstInfo := 0, 0, true, ""
	k := 0
	for _, a := range accounts {
		if !validAccount(a) {
			h.m.Lookups.WithLabelValues(metrics.LookupInvalid).Inc()
			resp.UserProfileItem = append(resp.UserProfileItem, im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{},
				ResultCode: im.CodeAccountNotFound, ResultInfo: "invalid account id: 1-32 bytes of printable ASCII"})
			continue
		}
		ans := answers[k]
		k++
		item := ans.Item
		switch {
		case ans.Err != nil:
			code, info := ErrorCode(ans.Err)
			item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}, ResultCode: code, ResultInfo: info}
			if errCount == 0 {
				firstCode, firstInfo = code, info
			} else if code != firstCode {
				sameCode = false
			}
			errCount++
			resp.FailAccount = append(resp.FailAccount, a)
			h.m.Lookups.WithLabelValues(metrics.LookupError).Inc()
		case item.ResultCode != 0:
			resp.FailAccount = append(resp.FailAccount, a)
			if im.Classify(item.ResultCode) == im.KindNotFound {
				h.m.Lookups.WithLabelValues(metrics.LookupNotFound).Inc()
			} else {
				h.m.Lookups.WithLabelValues(metrics.LookupFailed).Inc()
			}
		default:
			h.lookupsFound.Inc()
		}
		resp.UserProfileItem = append(resp.UserProfileItem, item)
	}
	if errCount > 0 && errCount == len(accounts) && sameCode {
		return fail(firstCode, firstInfo)
	}
	return resp
}

// ErrorCode turns a lookup error into the IM code and text a caller gets.
// It is the one place where errors become IM error codes; the text never
// holds a secret.
func ErrorCode(err error) (int, string) {
	var ue *upstream.Error
	switch {
	case errors.As(err, &ue) && ue.Code != 0:
		return ue.Code, "upstream: " + ue.Info
	case errors.As(err, &ue) && ue.Kind == im.KindHTTP:
		return im.CodeInternal, fmt.Sprintf("upstream unavailable (HTTP %d); retry", ue.Status)
	case errors.Is(err, context.DeadlineExceeded):
		return im.CodeInternalTimeout, "timed out waiting for the upstream; retry"
	case errors.Is(err, context.Canceled):
		return im.CodeInternalTimeout, "request cancelled"
	case errors.Is(err, cache.ErrOverloaded):
		return im.CodeFreqLimit, "too many lookups for the app's upstream quota: " + overloadCause(err) + "; retry later"
	case errors.Is(err, cache.ErrClosed):
		return im.CodeInternal, "proxy shutting down; retry"
	case errors.As(err, &ue):
		return im.CodeInternal, "upstream unreachable; retry"
	default:
		return im.CodeInternal, "internal error; retry"
	}
}

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
	var app, identifier, sig string
	var seen [4]bool // sdkappid, identifier, usersig, contenttype
	for rest := r.URL.RawQuery; rest != ""; {
		var kv string
		kv, rest, _ = strings.Cut(rest, "&")
		if strings.Contains(kv, ";") {
			// url.ParseQuery refuses it; an upstream may split on it.
			return fail(im.CodeHTTPParse, "query holds a ';'")
		}
		k, v, _ := strings.Cut(kv, "=")
		var err error
		if strings.ContainsAny(k, "%+") {
			if k, err = url.QueryUnescape(k); err != nil {
				return fail(im.CodeHTTPParse, "query is not well-formed")
			}
		}
		if strings.ContainsAny(v, "%+") {
			if v, err = url.QueryUnescape(v); err != nil {
				return fail(im.CodeHTTPParse, "query is not well-formed")
			}
		}
		i := slices.Index(authParams[:], k)
		if i < 0 {
			continue
		}
		if seen[i] {
			// The upstream may read another copy than the one checked
			// here: a forged UserSig, or another app's sdkappid, behind a
			// valid one.
			return fail(im.CodeHTTPParse, "query repeats "+k)
		}
		seen[i] = true
		switch i {
		case 0:
			app = v
		case 1:
			identifier = v
		case 2:
			sig = v
		}
	}
	if app == "" {
		if h.cfg.Auth == AuthNone {
			return nil
		}
		return fail(im.CodeSDKAppIDMissing, "sdkappid is missing")
	}
	if id, err := strconv.ParseUint(app, 10, 64); err != nil || id != h.cfg.SDKAppID {
		return fail(im.CodeSDKAppIDInvalid, "sdkappid is not this proxy's app")
	}
	if h.cfg.Auth == AuthNone {
		return nil
	}
	if err := h.sigs.verify(sig, identifier, h.cfg.Key, h.cfg.SDKAppID, h.cfg.Now()); err != nil {
		return fail(usersig.Code(err), err.Error())
	}
	if admin && identifier != h.cfg.Identifier {
		return fail(im.CodeNeedAdmin, "identifier is not the app admin")
	}
	return nil
}

// authParams are the query parameters the upstream authenticates and reads
// a call's format from; each may appear once.
var authParams = [...]string{"sdkappid", "identifier", "usersig", "contenttype"}

// sigCache remembers verified sigs briefly, so the hit path does not pay an
// inflate and an HMAC per request. Entries last at most sigCacheTTL and never
// past the sig's expiry; the map is cleared when it reaches sigCacheMax.
type sigCache struct {
	mu sync.RWMutex
	m  map[string]verified // by sig
}

type verified struct {
	identifier string
	until      time.Time
}

const (
	sigCacheTTL = 5 * time.Minute
	sigCacheMax = 4096
)

func (c *sigCache) verify(sig, identifier, key string, app uint64, now time.Time) error {
	c.mu.RLock()
	v, ok := c.m[sig]
	c.mu.RUnlock()
	if ok && v.identifier == identifier && now.Before(v.until) {
		return nil
	}
	claims, err := usersig.Verify(sig, key, app, identifier, now)
	if err != nil {
		return err
	}
	until := now.Add(sigCacheTTL)
	if claims.Expires.Before(until) {
		until = claims.Expires.Add(time.Second) // Verify accepts up to the expiry second inclusive
	}
	c.mu.Lock()
	if len(c.m) >= sigCacheMax {
		clear(c.m)
	}
	c.m[sig] = verified{identifier, until}
	c.mu.Unlock()
	return nil
}

// overloadCause is the loader's own words for an overload ("cache: loader
// overloaded: batcher: the upstream quota cannot serve ..."): the last part.
func overloadCause(err error) string {
	msg := err.Error()
	if i := strings.LastIndex(msg, ": batcher: "); i >= 0 {
		return msg[i+len(": batcher: "):]
	}
	return strings.TrimPrefix(msg, "cache: ")
}
