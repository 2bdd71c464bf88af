package httpapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// Setter forwards a portrait_set to the upstream under the set quota. It
// returns nil when the upstream applied the change, an *upstream.Error
// with the upstream's code when it refused it, or another error when the
// outcome is unknown (no answer). An error that also matches
// ErrMaybeApplied says some attempt's outcome is unknown even though the
// last one was refused (a timeout, then throttling).
type Setter interface {
	PortraitSet(ctx context.Context, req im.SetRequest) error
}

// ErrMaybeApplied marks a Setter error after which the upstream may hold
// the new value: an earlier attempt got no answer.
var ErrMaybeApplied = errors.New("httpapi: an attempt of portrait_set got no answer; it may have been applied")

// Changer applies profile changes to the cache; *cache.Cache satisfies it.
// Drop is Invalidate for a change nothing authenticates: it only drops
// tags already cached and creates no entry anywhere.
type Changer interface {
	Change(ctx context.Context, account string, items []im.ProfileItem, origin cache.Origin, event int64, at time.Time) error
	Invalidate(ctx context.Context, account string, tags []string, cause cache.Origin, at time.Time) error
	Drop(ctx context.Context, account string, tags []string, at time.Time) error
}

// MaxSetItems caps ProfileItem in one portrait_set or callback.
const MaxSetItems = 100

// CallbackClockWindow is how far a signed callback's RequestTime may be
// from this proxy's clock.
const CallbackClockWindow = 5 * time.Minute

func writeEnvelope(w http.ResponseWriter, status int, e im.Envelope) {
	b, _ := json.Marshal(e)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

func failEnvelope(code int, info string) im.Envelope {
	return im.Envelope{ActionStatus: im.StatusFail, ErrorCode: code, ErrorInfo: info}
}

// rawSet is portrait_set's body and, with the extra fields, a change
// callback's.
type rawSet struct {
	CallbackCommand string           `json:"CallbackCommand"`
	FromAccount     string           `json:"From_Account"`
	EventTime       int64            `json:"EventTime"`
	ProfileItem     []im.ProfileItem `json:"ProfileItem"`
}

// decodeSet parses and checks a portrait_set or callback body.
func decodeSet(raw []byte) (rawSet, *im.Envelope) {
	var req rawSet
	if err := json.Unmarshal(raw, &req); err != nil {
		var syntax *json.SyntaxError
		if errors.As(err, &syntax) || errors.Is(err, io.ErrUnexpectedEOF) || len(raw) == 0 {
			e := failEnvelope(im.CodeJSONParse, "request body is not valid JSON")
			return req, &e
		}
		e := failEnvelope(im.CodeBadRequest, "request body does not match {From_Account:string,ProfileItem:[{Tag:string,Value:any}]}")
		return req, &e
	}
	bad := func(info string) (rawSet, *im.Envelope) {
		e := failEnvelope(im.CodeBadRequest, info)
		return req, &e
	}
	if !validAccount(req.FromAccount) {
		return bad("From_Account must be 1-32 bytes of printable ASCII")
	}
	if len(req.ProfileItem) == 0 {
		return bad("ProfileItem is missing or empty")
	}
	if len(req.ProfileItem) > MaxSetItems {
		return bad(fmt.Sprintf("ProfileItem has %d items; at most %d", len(req.ProfileItem), MaxSetItems))
	}
	seen := map[string]bool{}
	for i, it := range req.ProfileItem {
		if !im.ValidTag(it.Tag) {
			e := failEnvelope(im.CodeInvalidTag, "invalid tag name: "+strconv.Quote(it.Tag))
			return req, &e
		}
		if seen[it.Tag] {
			return bad("tag given twice: " + it.Tag)
		}
		seen[it.Tag] = true
		if len(it.Value) == 0 || string(it.Value) == "null" {
			return bad("no Value for " + it.Tag)
		}
		var b bytes.Buffer
		if json.Compact(&b, it.Value) != nil {
			return bad("Value of " + it.Tag + " is not JSON")
		}
		req.ProfileItem[i].Value = json.RawMessage(b.Bytes())
	}
	return req, nil
}

// readBody reads r's body within Config.MaxBodyBytes, or returns the
// envelope a caller gets for it.
func (h *Handler) readBody(r *http.Request) ([]byte, *im.Envelope) {
	raw, e := h.readBodyInto(r, nil)
	if e != nil {
		return nil, e
	}
	return raw, nil
}

// portraitSet serves the drop-in v4/profile/portrait_set: the same checks
// as portrait_get, the call made under the set quota, and on success the
// changed tags written to every cache tier before the answer.
func (h *Handler) portraitSet(w http.ResponseWriter, r *http.Request) {
	e := h.serveSet(r)
	if e.ErrorCode == 0 {
		h.m.SetRequests.WithLabelValues("ok").Inc()
	} else {
		h.m.SetRequests.WithLabelValues(strconv.Itoa(e.ErrorCode)).Inc()
	}
	writeEnvelope(w, http.StatusOK, e)
}

func (h *Handler) serveSet(r *http.Request) im.Envelope {
	if r.Method != http.MethodPost {
		return failEnvelope(im.CodeHTTPParse, "portrait_set takes POST, not "+r.Method)
	}
	if h.cfg.Auth == AuthNone && !h.cfg.AuthNoneWrites {
		// No caller is authenticated: changing profiles with the app's
		// admin rights needs an explicit -auth-none-writes.
		return failEnvelope(im.CodeNeedAdmin, "portrait_set is off: this proxy authenticates no caller (-auth none); -auth-none-writes turns it on")
	}
	if e := h.authenticate(r); e != nil {
		return failEnvelope(e.ErrorCode, e.ErrorInfo)
	}
	raw, e := h.readBody(r)
	if e != nil {
		return *e
	}
	req, e := decodeSet(raw)
	if e != nil {
		return *e
	}
	ctx, cancel := context.WithTimeout(r.Context(), h.cfg.RequestTimeout)
	defer cancel()
	err := h.cfg.Setter.PortraitSet(ctx, im.SetRequest{FromAccount: req.FromAccount, ProfileItem: req.ProfileItem})
	// The cache is updated whatever the caller does now: it must not be
	// left behind the upstream.
	cctx, ccancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Second)
	defer ccancel()
	if err == nil {
		h.cfg.Changer.Change(cctx, req.FromAccount, req.ProfileItem, cache.FromSet, 0, h.cfg.Now())
		return im.Envelope{ActionStatus: im.StatusOK}
	}
	var ue *upstream.Error
	refused := errors.As(err, &ue) && ue.Code != 0
	if !refused || im.Classify(ue.Code) == im.KindTransient || errors.Is(err, ErrMaybeApplied) {
		// No answer, or an internal error, in any attempt: the change may
		// or may not have happened. The cached tags are dropped, so the
		// next lookup asks the upstream.
		h.cfg.Changer.Invalidate(cctx, req.FromAccount, tagsOf(req.ProfileItem), cache.FromSet, h.cfg.Now())
	}
	if refused {
		return im.Envelope{ActionStatus: im.StatusFail, ErrorCode: ue.Code, ErrorInfo: ue.Info} // as the upstream said it
	}
	code, info := ErrorCode(err)
	return failEnvelope(code, info)
}

// callback receives the upstream's change callbacks. It answers the OK
// envelope for every well-formed callback of this app (other commands are
// acknowledged and ignored), HTTP 403 for a wrong app or signature and 400
// for a body that is not a callback or whose EventTime is in the future.
// With a CallbackToken, a signed callback's values are applied, once: an
// exact repeat (same RequestTime, Sign and body within the signature's
// window) is acknowledged and not applied again. Unsigned (only with
// CallbackUnsigned), a callback only drops the changed tags where they are
// cached, at most CallbackUnsignedRate a second (HTTP 429 beyond).
func (h *Handler) callback(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		h.m.Callbacks.WithLabelValues("invalid").Inc()
		writeEnvelope(w, http.StatusMethodNotAllowed, failEnvelope(im.CodeHTTPParse, "callbacks are POSTed"))
		return
	}
	q := r.URL.Query()
	if id, err := strconv.ParseUint(q.Get("SdkAppid"), 10, 64); err != nil || id != h.cfg.SDKAppID {
		h.m.Callbacks.WithLabelValues("rejected").Inc()
		writeEnvelope(w, http.StatusForbidden, failEnvelope(im.CodeSDKAppIDInvalid, "SdkAppid is not this proxy's app"))
		return
	}
	now := h.cfg.Now()
	signed := h.cfg.CallbackToken != ""
	if signed {
		if err := checkCallbackSign(h.cfg.CallbackToken, q.Get("RequestTime"), q.Get("Sign"), now); err != nil {
			h.m.Callbacks.WithLabelValues("rejected").Inc()
			writeEnvelope(w, http.StatusForbidden, failEnvelope(im.CodeSigMismatch, err.Error()))
			return
		}
	} else if !h.unsigned.AllowN(now, 1) {
		h.m.Callbacks.WithLabelValues("limited").Inc()
		writeEnvelope(w, http.StatusTooManyRequests, failEnvelope(im.CodeFreqLimit, "too many unsigned callbacks; try again later"))
		return
	}
	raw, e := h.readBody(r)
	if e != nil {
		h.m.Callbacks.WithLabelValues("invalid").Inc()
		writeEnvelope(w, http.StatusBadRequest, *e)
		return
	}
	var head struct {
		CallbackCommand string `json:"CallbackCommand"`
	}
	json.Unmarshal(raw, &head)
	if cmd := q.Get("CallbackCommand"); cmd != im.CallbackCommand && head.CallbackCommand != im.CallbackCommand {
		h.m.Callbacks.WithLabelValues("ignored").Inc()
		writeEnvelope(w, http.StatusOK, im.Envelope{ActionStatus: im.StatusOK})
		return
	}
	ev, e := decodeSet(raw)
	if e == nil && ev.EventTime <= 0 {
		bad := failEnvelope(im.CodeBadRequest, "EventTime is missing")
		e = &bad
	}
	if e == nil && ev.EventTime > now.Add(h.cfg.ClockSkew).UnixMilli() {
		// A change from the future would outrank every later one.
		bad := failEnvelope(im.CodeBadRequest, "EventTime is in the future")
		e = &bad
	}
	if e != nil {
		h.m.Callbacks.WithLabelValues("invalid").Inc()
		writeEnvelope(w, http.StatusBadRequest, *e)
		return
	}
	if signed && h.replays.seen(replayKey(q.Get("RequestTime"), q.Get("Sign"), raw), now) {
		h.m.Callbacks.WithLabelValues("repeat").Inc()
		writeEnvelope(w, http.StatusOK, im.Envelope{ActionStatus: im.StatusOK})
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Second)
	defer cancel()
	if signed {
		h.cfg.Changer.Change(ctx, ev.FromAccount, ev.ProfileItem, cache.FromCallback, ev.EventTime, now)
	} else {
		// Nothing proves the callback comes from the upstream: its values
		// are not served, and it creates nothing (no key, no entry): the
		// tags are only dropped where they are cached, so a forged callback
		// can cause refetches of a cached tag (while its drop outranks
		// fetches: -clock-skew), never a wrong answer nor memory growth.
		h.cfg.Changer.Drop(ctx, ev.FromAccount, tagsOf(ev.ProfileItem), now)
	}
	h.m.Callbacks.WithLabelValues("ok").Inc()
	writeEnvelope(w, http.StatusOK, im.Envelope{ActionStatus: im.StatusOK})
}

func checkCallbackSign(token, requestTime, sign string, now time.Time) error {
	if requestTime == "" || sign == "" {
		return errors.New("callback is not signed (Sign and RequestTime required)")
	}
	sec, err := strconv.ParseInt(requestTime, 10, 64)
	if err != nil {
		return errors.New("RequestTime is not a number")
	}
	if d := now.Sub(time.Unix(sec, 0)); d > CallbackClockWindow || d < -CallbackClockWindow {
		return errors.New("RequestTime is too far from this proxy's clock")
	}
	if subtle.ConstantTimeCompare([]byte(im.CallbackSign(token, requestTime)), []byte(sign)) != 1 {
		return errors.New("callback signature does not match")
	}
	return nil
}

func tagsOf(items []im.ProfileItem) []string {
	tags := make([]string, len(items))
	for i, it := range items {
		tags[i] = it.Tag
	}
	return tags
}

// replayMemo remembers the signed callbacks applied while their signature
// can be valid (RequestTime ± CallbackClockWindow), so an exact repeat is
// not applied again. It keeps two generations of twice that window, each
// at most maxReplays keys: a key is known for at least two windows, and the memo never holds more than 2*maxReplays
// keys (a full generation starts the next one early; what falls out is
// still ordered by the supersedes rules, which never let an exact repeat
// replace a newer value). The zero value is ready.
type replayMemo struct {
	mu        sync.Mutex
	cur, prev map[[sha256.Size]byte]struct{}
	started   time.Time
}

const maxReplays = 50_000

func replayKey(requestTime, sign string, body []byte) [sha256.Size]byte {
	bh := sha256.Sum256(body)
	h := sha256.New()
	h.Write([]byte(requestTime))
	h.Write([]byte{0})
	h.Write([]byte(sign))
	h.Write([]byte{0})
	h.Write(bh[:])
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// seen reports whether k was seen before, and remembers it.
func (m *replayMemo) seen(k [sha256.Size]byte, now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cur == nil || now.Sub(m.started) >= 2*CallbackClockWindow || len(m.cur) >= maxReplays {
		m.prev, m.cur, m.started = m.cur, make(map[[sha256.Size]byte]struct{}), now
	}
	if _, ok := m.cur[k]; ok {
		return true
	}
	if _, ok := m.prev[k]; ok {
		return true
	}
	m.cur[k] = struct{}{}
	return false
}
