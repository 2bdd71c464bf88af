package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// Forwarding: every /v4/<service>/<command> other than portrait_get and
// portrait_set goes to the upstream unchanged (method, path, query, body,
// content type; the answer's status, headers and body come back as they
// are), through httputil.ReverseProxy over the upstream client's transport.
//
//   - The caller's own identifier and usersig go upstream, and the upstream
//     authenticates them; the proxy's admin credentials are never added. In
//     AuthUserSig mode the proxy first checks the sdkappid and the UserSig's
//     signature (any identifier: the app may have several admins), so a
//     forged one never reaches the upstream, where failures count against
//     the whole app's sig-failure limit (70050).
//   - A call is never retried: most commands (sendmsg, imports) are not
//     idempotent. The body streams through (bounded by MaxBodyBytes) with
//     no GetBody, so Go's transport never sends it again; the account
//     calls' bodies (at most 64 KiB) are read first and sent from memory,
//     re-sent only when nothing of them was written.
//   - Throttling answers come back as the upstream gave them.
//   - No answer (refused, reset, timeout) is answered the IM way: HTTP 200,
//     ActionStatus FAIL, an IM code and an ErrorInfo that says whether the
//     call may have been applied.
//   - The account calls that change which accounts exist
//     (account_import, multiaccount_import, account_delete) are read, both
//     ways and bounded, to keep the cache true (see Accounts).

// Accounts is told of account lifecycle changes seen on forwarded calls;
// *cache.Cache satisfies it. Each method applies to every cache tier and
// every replica before the caller's answer is written.
type Accounts interface {
	// Imported: accounts exist as of at; drop what says otherwise.
	Imported(ctx context.Context, accounts []string, at time.Time) error
	// Deleted: accounts were deleted as of at (known), or may have been
	// (!known: the outcome could not be read); drop their profiles.
	Deleted(ctx context.Context, accounts []string, at time.Time, known bool) error
}

// ForwardConfig enables forwarding of every other /v4 API.
type ForwardConfig struct {
	// Upstream is the IM REST API base URL (a path prefix is kept).
	Upstream string
	// Transport carries the calls: the upstream client's, for its
	// connection reuse and timeouts. Nil means upstream.NewTransport().
	Transport http.RoundTripper
	// Timeout bounds one forwarded call. Zero means 10s.
	Timeout time.Duration
	// MaxBodyBytes caps a forwarded request body. Zero means
	// DefaultForwardMaxBody (1 MiB).
	MaxBodyBytes int64
	// Accounts, if set, is told of imports and deletions.
	Accounts Accounts
	// OnError, if set, is told of every forwarded call that got no answer:
	// its service label, result (unreachable, timeout, canceled) and
	// error, whose text never holds the query (it carries the UserSig).
	OnError func(service, result string, err error)
}

// Paths of the account calls read for the cache's sake.
const (
	pathAccountImport      = "/v4/im_open_login_svc/account_import"
	pathMultiAccountImport = "/v4/im_open_login_svc/multiaccount_import"
	pathAccountDelete      = "/v4/im_open_login_svc/account_delete"
)

// maxAccountBody bounds an account call's body, which is read whole (100
// accounts with their nicknames and face URLs take a few KiB).
const maxAccountBody = 64 << 10

func isAccountPath(p string) bool {
	return p == pathAccountImport || p == pathMultiAccountImport || p == pathAccountDelete
}

// maxLifecycleAccounts bounds the accounts read from one account call (the
// upstream takes at most 100); maxLifecycleAnswer bounds its answer read.
const (
	maxLifecycleAccounts = 1000
	maxLifecycleAnswer   = 1 << 20
)

type forwarder struct {
	h    *Handler
	cfg  ForwardConfig
	base *url.URL
	rp   *httputil.ReverseProxy
}

// lifecycleKey carries a call's accounts from the handler to ModifyResponse.
type lifecycleKey struct{}

type lifecycle struct {
	path     string
	accounts []string
	// admin: the proxy itself verified the caller as the app admin, so an
	// outcome it could not read may be acted on (see apply).
	admin bool
}

func newForwarder(h *Handler, cfg ForwardConfig) (*forwarder, error) {
	u, err := url.Parse(cfg.Upstream)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("httpapi: ForwardConfig.Upstream must be an http(s) URL")
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath, u.RawQuery, u.Fragment = "", "", ""
	if cfg.Transport == nil {
		cfg.Transport = upstream.NewTransport()
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.MaxBodyBytes <= 0 {
		cfg.MaxBodyBytes = DefaultForwardMaxBody
	}
	f := &forwarder{h: h, cfg: cfg, base: u}
	f.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(f.base) // path joined to the base's, query kept as sent
			// Go's transport may send a request again after a failure when
			// it looks idempotent; these headers would make it so, and mean
			// nothing to the IM API.
			pr.Out.Header.Del("Idempotency-Key")
			pr.Out.Header.Del("X-Idempotency-Key")
			if pr.Out.Context().Value(lifecycleKey{}) != nil {
				// An account call's answer is read here: without the
				// caller's Accept-Encoding, Go's transport asks for gzip
				// itself and hands back the answer decoded.
				pr.Out.Header.Del("Accept-Encoding")
			}
		},
		Transport:      cfg.Transport,
		BufferPool:     copyBuffers{},
		ModifyResponse: f.modifyResponse,
		ErrorHandler:   f.errorHandler,
		// The reverse proxy's own log lines could only repeat what the
		// metrics count; a library does not log.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	return f, nil
}

// copyBuffers lends the reverse proxy its 32 KiB copy buffers, which it
// would otherwise allocate for every answer.
type copyBuffers struct{}

var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (copyBuffers) Get() []byte  { return *copyBufPool.Get().(*[]byte) }
func (copyBuffers) Put(b []byte) { copyBufPool.Put(&b) }

// apiPath splits a canonical /v4/<service>/<command> path; ok is false
// for any other shape. Names are what the IM API uses: letters, digits, _.
func apiPath(p string) (service, command string, ok bool) {
	rest, found := strings.CutPrefix(p, "/v4/")
	if !found {
		return "", "", false
	}
	service, command, found = strings.Cut(rest, "/")
	if !found || !apiName(service) || !apiName(command) {
		return "", "", false
	}
	return service, command, true
}

func apiName(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// serve forwards one call (r.URL.Path is canonical, see canonicalPath).
func (f *forwarder) serve(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	service, _, ok := apiPath(r.URL.Path)
	label := metrics.ForwardService(service)
	reject := func(code int, info string) {
		f.h.m.Forwarded.WithLabelValues(label, metrics.ForwardRejected).Inc()
		writeEnvelope(w, http.StatusOK, failEnvelope(code, info))
	}
	if code, info := f.refusal(r, ok); code != 0 {
		reject(code, info)
		return
	}
	// Only the account calls are read here (their bodies are small); every
	// other body streams through, so callers that stall mid-body hold no
	// more than a copy buffer each.
	account := f.cfg.Accounts != nil && isAccountPath(r.URL.Path)
	var raw []byte
	if account {
		var code int
		var info string
		if raw, code, info = f.readAccountBody(r); code != 0 {
			reject(code, info)
			return
		}
	}
	out, cancel := f.outgoing(w, r, account, raw)
	defer cancel()
	sw := &statusWriter{ResponseWriter: w}
	defer f.count(label, start, sw)
	f.rp.ServeHTTP(sw, out)
}

// refusal is the code and info a call is refused with before it is sent
// (0 when it may go): not an API path (ok false), not POST, a bad sdkappid
// or UserSig, a declared body over the limit.
func (f *forwarder) refusal(r *http.Request, ok bool) (code int, info string) {
	switch {
	case !ok || r.URL.RawPath != "":
		return im.CodeHTTPParse, "no such API: " + strconv.Quote(r.URL.Path)
	case r.Method != http.MethodPost:
		return im.CodeHTTPParse, "the IM REST API takes POST, not " + r.Method
	}
	if e := f.h.verifyQuery(r, false); e != nil {
		return e.ErrorCode, e.ErrorInfo
	}
	if r.ContentLength > f.cfg.MaxBodyBytes {
		return im.CodeBadRequest, "request body larger than " + strconv.FormatInt(f.cfg.MaxBodyBytes, 10) + " bytes"
	}
	return 0, ""
}

// readAccountBody reads an account call's body, which the cache must see;
// on failure it returns the code and info to refuse the call with.
func (f *forwarder) readAccountBody(r *http.Request) (raw []byte, code int, info string) {
	raw, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, min(f.cfg.MaxBodyBytes, maxAccountBody)))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, im.CodeBadRequest, "account call body larger than " + strconv.FormatInt(tooBig.Limit, 10) + " bytes"
		}
		return nil, im.CodeHTTPParse, "reading request body failed"
	}
	return raw, 0, ""
}

// outgoing is the request sent upstream for r, under the forward timeout:
// an account call's body raw (read already), any other's streamed.
func (f *forwarder) outgoing(w http.ResponseWriter, r *http.Request, account bool, raw []byte) (*http.Request, context.CancelFunc) {
	parent := r.Context()
	var lc *lifecycle
	if account {
		if lc = readLifecycle(r.URL.Path, raw); lc != nil {
			// The answer decides what the cache drops, so it is read even
			// when the caller hangs up: a caller cannot make a refused
			// call's outcome unknown by leaving.
			parent = context.WithoutCancel(parent)
			lc.admin = f.h.cfg.Auth != AuthNone && f.h.verifyQuery(r, true) == nil
		}
	}
	ctx, cancel := context.WithTimeout(parent, f.cfg.Timeout)
	if lc != nil {
		ctx = context.WithValue(ctx, lifecycleKey{}, lc)
	}
	out := r.WithContext(ctx)
	if account {
		out.Body, out.ContentLength, out.TransferEncoding = io.NopCloser(bytes.NewReader(raw)), int64(len(raw)), nil
	} else {
		out.Body = http.MaxBytesReader(w, r.Body, f.cfg.MaxBodyBytes) // no GetBody: Go's transport never sends it again
	}
	out.Header.Del("Expect") // the body is read (or streamed) without waiting for the upstream's 100
	return out, cancel
}

// count records a forwarded call's result and duration. It is deferred:
// when the caller leaves mid-answer the reverse proxy panics with
// http.ErrAbortHandler, which is counted as canceled and passed on to the
// server.
func (f *forwarder) count(label string, start time.Time, sw *statusWriter) {
	p := recover()
	result := metrics.ForwardOK
	switch {
	case p != nil:
		result = metrics.ForwardCanceled
	case sw.result != "":
		result = sw.result
	case sw.status < 200 || sw.status > 299:
		result = metrics.ForwardHTTP
	}
	f.h.m.Forwarded.WithLabelValues(label, result).Inc()
	f.h.m.ForwardDuration.WithLabelValues(label).Observe(time.Since(start).Seconds())
	if p != nil {
		panic(p)
	}
}

// statusWriter remembers the status written and the result errorHandler
// decided.
type statusWriter struct {
	http.ResponseWriter
	status int
	result string
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 && code >= 200 { // not an informational 1xx passed on
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Flush and Unwrap let the reverse proxy flush through the wrapper.
func (s *statusWriter) Flush() {
	if fl, ok := s.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// errorHandler answers a call that got no answer from the upstream the IM
// way: HTTP 200, an IM code, and whether the call may have been applied.
// The error's own text is not used: it holds the URL, with the UserSig.
func (f *forwarder) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	sw, _ := w.(*statusWriter)
	if r.Context().Err() != nil && !errors.Is(r.Context().Err(), context.DeadlineExceeded) {
		// The caller left; nobody reads the answer.
		if sw != nil {
			sw.result = metrics.ForwardCanceled
		}
		f.unknownOutcome(r)
		return
	}
	var code int
	var info, result string
	var op *net.OpError
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		code, info, result = im.CodeBadRequest,
			"request body larger than "+strconv.FormatInt(tooBig.Limit, 10)+" bytes: the call was cut off and not completed", metrics.ForwardRejected
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		code, info, result = im.CodeInternalTimeout,
			"upstream did not answer within "+f.cfg.Timeout.String()+"; the call was not retried and may have been applied", metrics.ForwardTimeout
	case errors.As(err, &op) && op.Op == "dial":
		code, _ = ErrorCode(&upstream.Error{Kind: im.KindTransport, Err: err})
		info, result = "upstream unreachable (could not connect): the call was not sent", metrics.ForwardUnreachable
	default:
		code, _ = ErrorCode(&upstream.Error{Kind: im.KindTransport, Err: err})
		info, result = "upstream closed the connection without an answer: the call was not retried and may have been applied", metrics.ForwardUnreachable
	}
	if sw != nil {
		sw.result = result
	}
	if f.cfg.OnError != nil {
		service, _, _ := apiPath(r.URL.Path)
		f.cfg.OnError(metrics.ForwardService(service), result, redactQuery(err, r.URL.RawQuery))
	}
	f.unknownOutcome(r)
	writeEnvelope(w, http.StatusOK, failEnvelope(code, info))
}

var usersigParam = regexp.MustCompile(`(?i)usersig=[^&\s"]*`)

// redactQuery returns err's text without the request's query and without
// any usersig parameter, wherever the HTTP stack may have put them.
func redactQuery(err error, rawQuery string) error {
	msg := err.Error()
	if rawQuery != "" {
		msg = strings.ReplaceAll(msg, rawQuery, "REDACTED")
	}
	return errors.New(usersigParam.ReplaceAllString(msg, "usersig=REDACTED"))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// readLifecycle returns the accounts an account call names, or nil for any
// other call (or a body that names none the cache could hold).
func readLifecycle(path string, body []byte) *lifecycle {
	var names []string
	switch path {
	case pathAccountImport:
		var req struct{ UserID, Identifier string }
		if json.Unmarshal(body, &req) != nil {
			return nil
		}
		names = []string{req.UserID}
		if req.UserID == "" {
			names = []string{req.Identifier}
		}
	case pathMultiAccountImport:
		var req struct {
			Accounts    []json.RawMessage
			AccountList []struct{ UserID json.RawMessage }
		}
		if json.Unmarshal(body, &req) != nil {
			return nil
		}
		for _, a := range req.Accounts {
			names = append(names, rawString(a))
		}
		for _, a := range req.AccountList {
			names = append(names, rawString(a.UserID))
		}
	case pathAccountDelete:
		var req struct {
			DeleteItem []struct{ UserID json.RawMessage }
		}
		if json.Unmarshal(body, &req) != nil {
			return nil
		}
		for _, it := range req.DeleteItem {
			names = append(names, rawString(it.UserID))
		}
	default:
		return nil
	}
	if len(names) > maxLifecycleAccounts {
		return nil // the upstream refuses it whole (100 at most)
	}
	lc := &lifecycle{path: path}
	for _, a := range names {
		if validAccount(a) && !contains(lc.accounts, a) {
			lc.accounts = append(lc.accounts, a)
		}
	}
	if len(lc.accounts) == 0 {
		return nil
	}
	return lc
}

func rawString(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return ""
	}
	return s
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// modifyResponse reads an account call's answer (bounded) and tells the
// cache what changed before the answer goes back; other answers pass
// untouched.
func (f *forwarder) modifyResponse(resp *http.Response) error {
	lc, _ := resp.Request.Context().Value(lifecycleKey{}).(*lifecycle)
	if lc == nil {
		return nil
	}
	at := time.Now()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Encoding") != "" {
		f.apply(resp.Request, lc, nil, at)
		return nil
	}
	orig := resp.Body
	raw, err := io.ReadAll(io.LimitReader(orig, maxLifecycleAnswer+1))
	if err != nil {
		return err // answered as no answer (errorHandler): the body is lost
	}
	if len(raw) > maxLifecycleAnswer {
		// Too long to be an account call's answer: pass it on, whole,
		// with the outcome taken as unknown.
		resp.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(raw), orig), orig}
		f.apply(resp.Request, lc, nil, at)
		return nil
	}
	orig.Close()
	resp.Body = io.NopCloser(bytes.NewReader(raw))
	resp.ContentLength = int64(len(raw))
	resp.Header.Set("Content-Length", strconv.Itoa(len(raw)))
	resp.TransferEncoding = nil
	f.apply(resp.Request, lc, raw, at)
	return nil
}

// unknownOutcome tells the cache of an account call whose answer never
// came: it may have been applied.
func (f *forwarder) unknownOutcome(r *http.Request) {
	if lc, _ := r.Context().Value(lifecycleKey{}).(*lifecycle); lc != nil {
		f.apply(r, lc, nil, time.Now())
	}
}

// apply tells the cache what an account call changed. answer is nil when
// the outcome is unknown (no answer, a non-200 status, an answer too long
// to read): only when the proxy itself verified the caller as the app
// admin (AuthUserSig) can the call have been applied, and then imports
// still drop "not found" (harmless if the import failed) and deletions
// drop the profiles without asserting "not found"; any other caller's
// unknown outcome changes nothing (the upstream refuses non-admins, and
// anyone could otherwise make every replica drop accounts at will). A call
// the upstream refused (ErrorCode not 0) changed nothing. Only accounts
// the request named are touched, whatever the answer lists.
func (f *forwarder) apply(r *http.Request, lc *lifecycle, answer []byte, at time.Time) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Second)
	defer cancel()
	var ans struct {
		ErrorCode    *int
		FailAccounts []string
		ResultItem   []struct {
			ResultCode int
			UserID     string
		}
	}
	known := answer != nil && json.Unmarshal(answer, &ans) == nil && ans.ErrorCode != nil
	if known && *ans.ErrorCode != 0 || !known && !lc.admin {
		return
	}
	switch lc.path {
	case pathAccountImport, pathMultiAccountImport:
		imported := lc.accounts
		if known && len(ans.FailAccounts) > 0 {
			imported = nil
			for _, a := range lc.accounts {
				if !contains(ans.FailAccounts, a) {
					imported = append(imported, a)
				}
			}
		}
		f.cfg.Accounts.Imported(ctx, imported, at)
	case pathAccountDelete:
		if !known {
			f.cfg.Accounts.Deleted(ctx, lc.accounts, at, false)
			return
		}
		var deleted, unknown []string
		for _, a := range lc.accounts {
			code, found := 0, false
			for _, it := range ans.ResultItem {
				if it.UserID == a {
					code, found = it.ResultCode, true
					break
				}
			}
			switch {
			case !found:
				unknown = append(unknown, a)
			case code == 0:
				deleted = append(deleted, a)
			}
		}
		f.cfg.Accounts.Deleted(ctx, deleted, at, true)
		f.cfg.Accounts.Deleted(ctx, unknown, at, false)
	}
}
