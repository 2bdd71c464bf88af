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
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// Lookup answers accounts for tags; *cache.Cache satisfies it. Neither
// method may change or keep accounts or tags: the tag list of a request
// is shared with others of the same TagList, and the account list is
// reused. Hits answers from memory alone into the caller's buffers, or
// says ok false having counted nothing (see cache.Cache.Hits); Get then
// answers, waiting as long as ctx allows.
type Lookup interface {
	Hits(dst []cache.Answer, items []im.ProfileItem, accounts, tags []string) ([]cache.Answer, []im.ProfileItem, bool)
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
	DefaultMaxBody              = 1 << 20         // Config.MaxBodyBytes
)

// Config configures a Handler. Lookup and SDKAppID are required, and Key
// unless Auth is AuthNone.
type Config struct {
	Lookup     Lookup
	SDKAppID   uint64
	Identifier string // the admin account callers must present; default im.DefaultAdministrator
	Key        string // the app's secret key, to verify callers' UserSigs
	Auth       string // AuthUserSig (default) or AuthNone
	// MaxBodyBytes caps a request body. Zero means DefaultMaxBody.
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
	requestsOK prometheus.Counter
	lookups    lookupCounters
	realClock  bool   // cfg.Now is time.Now: a request's start time serves as now
	appID      string // cfg.SDKAppID in decimal
	sigs       sigCache
	tagSets    tagSets
	mux        *http.ServeMux
	fwd        *forwarder
	replays    replayMemo
	unsigned   *rate.Limiter // unsigned callbacks' bound
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
		cfg.MaxBodyBytes = DefaultMaxBody
	}
	if cfg.MaxAccounts <= 0 {
		cfg.MaxAccounts = DefaultMaxAccounts
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	realClock := cfg.Now == nil
	if realClock {
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
	h := &Handler{cfg: cfg, m: cfg.Metrics, realClock: realClock, appID: strconv.FormatUint(cfg.SDKAppID, 10),
		requestsOK: cfg.Metrics.Requests.WithLabelValues("ok"),
		lookups:    newLookupCounters(cfg.Metrics),
		unsigned:   rate.NewLimiter(rate.Limit(cfg.CallbackUnsignedRate), max(1, int(cfg.CallbackUnsignedRate)))}
	h.sigs.m.max, h.tagSets.m.max = sigCacheMax, tagSetsMax
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
	if r.URL.Path == im.PathGet && r.URL.RawPath == "" {
		// The mux's choice for this path, without its matching.
		h.portraitGet(w, r)
		return
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

func (h *Handler) write(w http.ResponseWriter, status int, resp *im.GetResponse) {
	bp := getBuf()
	b := resp.AppendJSON(*bp)
	writeJSON(w, status, b)
	putBuf(bp, b)
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
	if e := checkAccounts(len(req.ToAccount), maxAccounts); e != nil {
		return nil, nil, e
	}
	if e := checkTags(req.TagList); e != nil {
		return nil, nil, e
	}
	// Each tag is answered once, as the upstream does, however often it is
	// named. Repeated accounts are answered once per mention, in order.
	return req.ToAccount, im.DedupTags(req.TagList), nil
}

// checkAccounts checks the number of accounts a body names.
func checkAccounts(n, maxAccounts int) *im.GetResponse {
	if n == 0 {
		return fail(im.CodeNoAccount, "To_Account is missing or empty")
	}
	if n > maxAccounts {
		return fail(im.CodeBadRequest, fmt.Sprintf("To_Account has %d accounts; this proxy serves at most %d per request", n, maxAccounts))
	}
	return nil
}

// checkTags checks a body's TagList as given (repeats included).
func checkTags(tags []string) *im.GetResponse {
	if len(tags) == 0 {
		return fail(im.CodeBadRequest, "TagList is missing or empty")
	}
	if len(tags) > im.MaxTagsPerCall {
		return fail(im.CodeBadRequest, fmt.Sprintf("TagList has %d entries; at most %d are accepted", len(tags), im.MaxTagsPerCall))
	}
	for _, t := range tags {
		if !im.ValidTag(t) {
			return fail(im.CodeInvalidTag, "invalid tag name: "+strconv.Quote(t))
		}
	}
	return nil
}

func (h *Handler) portraitGet(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sc := scratchPool.Get().(*getScratch)
	b, code := h.serveHTTP(r, start, sc)
	h.count(code, start)
	writeJSON(w, http.StatusOK, b)
	sc.out = b
	putScratch(sc)
}

// serveHTTP returns the answer to r, appended to sc.out, and its
// ErrorCode.
func (h *Handler) serveHTTP(r *http.Request, start time.Time, sc *getScratch) ([]byte, int) {
	if r.Method != http.MethodPost {
		return appendFail(sc.out, im.CodeHTTPParse, "portrait_get takes POST, not "+r.Method)
	}
	if e := h.verifyRawQuery(r.URL.RawQuery, true, h.nowAt(start)); e != nil {
		return e.AppendJSON(sc.out), e.ErrorCode
	}
	raw, bad := h.readBodyInto(r, sc.body)
	sc.body = raw
	if bad != nil {
		return appendFail(sc.out, bad.ErrorCode, bad.ErrorInfo)
	}
	return h.lookup(r.Context(), raw, start, sc, sc.out)
}

// ServeFast answers a portrait_get POST the API's front read itself
// (front.Handler): with rawQuery and body, appending the answer to out.
// It keeps nothing of rawQuery or body.
func (h *Handler) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	start := time.Now()
	var code int
	if e := h.verifyRawQuery(rawQuery, true, h.nowAt(start)); e != nil {
		out, code = e.AppendJSON(out), e.ErrorCode
	} else if int64(len(body)) > h.cfg.MaxBodyBytes { // as readBodyInto
		out, code = appendFail(out, im.CodeBadRequest, fmt.Sprintf("request body larger than %d bytes", h.cfg.MaxBodyBytes))
	} else {
		sc := scratchPool.Get().(*getScratch)
		out, code = h.lookup(ctx, body, start, sc, out)
		putScratch(sc)
	}
	h.count(code, start)
	return out
}

// nowAt is the time a request begun at start is checked at: start
// itself, unless the handler was given a clock.
func (h *Handler) nowAt(start time.Time) time.Time {
	if h.realClock {
		return start
	}
	return h.cfg.Now()
}

// count counts a portrait_get answered with code, begun at start.
func (h *Handler) count(code int, start time.Time) {
	if code == 0 {
		h.requestsOK.Inc()
	} else {
		h.m.Requests.WithLabelValues(strconv.Itoa(code)).Inc()
	}
	h.m.RequestDuration.Observe(time.Since(start).Seconds())
}

// lookup appends the answer to a portrait_get of raw, an authenticated
// caller's body, to b, and returns it with its ErrorCode. ctx is the
// request's.
func (h *Handler) lookup(ctx context.Context, raw []byte, start time.Time, sc *getScratch, b []byte) ([]byte, int) {
	accounts, tags, e := h.decodeGet(raw, &sc.scan, sc.accounts[:0])
	if e != nil {
		return e.AppendJSON(b), e.ErrorCode
	}
	sc.accounts = accounts
	if h.cfg.Tags != nil {
		// The upstream refuses the whole call for such a tag: so do we,
		// without spending a call on it.
		if code, info, refused := h.cfg.Tags.Check(tags); refused {
			return appendFail(b, code, info)
		}
	}
	valid := accounts
	if !allValid(accounts) {
		valid = make([]string, 0, len(accounts))
		for _, a := range accounts {
			if validAccount(a) {
				valid = append(valid, a)
			}
		}
	}
	var answers []cache.Answer
	if len(valid) > 0 {
		var ok bool
		answers, sc.items, ok = h.cfg.Lookup.Hits(sc.answers[:0], sc.items[:0], valid, tags)
		sc.answers = answers
		if !ok {
			// Allocated, not pooled: the lookup may keep its context.
			c := &deadlineCtx{parent: ctx}
			// start's monotonic clock plus the time since: time.Now
			// without reading the wall clock.
			c.deadline = start.Add(time.Since(start) + h.cfg.RequestTimeout)
			answers = h.cfg.Lookup.Get(c, valid, tags)
			c.end()
		}
	}
	return h.appendAnswers(b, accounts, answers)
}

func appendFail(b []byte, code int, info string) ([]byte, int) {
	return fail(code, info).AppendJSON(b), code
}

func allValid(accounts []string) bool {
	for _, a := range accounts {
		if !validAccount(a) {
			return false
		}
	}
	return true
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

// overloadCause is the loader's words for an overload (cache.Refusal), or
// the error's own.
func overloadCause(err error) string {
	if r, ok := errors.AsType[*cache.Refusal](err); ok {
		return r.Words
	}
	return err.Error()
}
