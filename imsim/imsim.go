// Package imsim emulates the IM REST API's profile calls for tests, demos and
// benchmarks: v4/profile/portrait_get and v4/profile/portrait_set; the
// account calls that change which accounts exist (account_import,
// multiaccount_import, account_delete); and a generic OK answer for every
// other v4 API, each checked and recorded (Seen) like the real service.
//
// The emulator checks the query and the admin UserSig as the real service
// does, enforces the call quota over a sliding one-second window and the
// 100-account limit, and serves generated profiles for the accounts
// "user0" … "user<Accounts-1>" (writes made with portrait_set overlay them).
// Where the public documentation leaves behaviour open, Behaviour selects
// it; Faults injects latency, 502s, timeouts and per-item errors. Every call
// is recorded in Stats so tests can assert on what the upstream saw.
//
// A Server is an http.Handler and is safe for concurrent use; its settings
// may be changed while it serves, in-process or through POST /imsim/config.
package imsim

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Defaults of Config and Behaviour, exported for the flags that show them.
const (
	DefaultSDKAppID     = 1400000000        // Config.SDKAppID
	DefaultAccounts     = 1_000_000         // Config.Accounts
	DefaultQuota        = 100               // Behaviour.Quota
	DefaultThrottleCode = im.CodeFreqLimit  // Behaviour.ThrottleCode
	DefaultSetQuota     = 200               // Behaviour.SetQuota
	DefaultAPIQuota     = 100               // Behaviour.APIQuota
	DefaultRejectCode   = im.CodeBadRequest // Behaviour.RejectCode
)

// Config is the emulated app. Zero fields take the defaults noted.
type Config struct {
	SDKAppID   uint64 // default DefaultSDKAppID
	Identifier string // the admin account; default im.DefaultAdministrator
	Key        string // the app's secret key; default "imsim-secret-key"
	Accounts   int    // seeded accounts user0…; default DefaultAccounts
	Behaviour  Behaviour
	Faults     Faults
	Callback   Callback // change callbacks; none when Callback.URL is empty
	Seed       uint64   // seed of the fault dice; default 1
}

// Behaviour selects among plausible upstream behaviours the public
// documentation does not settle.
type Behaviour struct {
	// Quota is the number of portrait_get calls accepted in any sliding
	// second. Default DefaultQuota; negative means unlimited.
	Quota int `json:"quota"`
	// ThrottleCode answers a call over the quota. Default DefaultThrottleCode.
	ThrottleCode int `json:"throttle_code"`
	// MissingFailsCall makes a call naming a non-existent account fail as a
	// whole with 40003, instead of failing only that account's item.
	MissingFailsCall bool `json:"missing_fails_call"`
	// UnsetAsEmpty returns an unset tag with an empty value instead of
	// omitting it.
	UnsetAsEmpty bool `json:"unset_as_empty"`
	// MaxAccounts is the per-call account limit. Default 100.
	MaxAccounts int `json:"max_accounts"`
	// SetQuota is the number of portrait_set calls accepted in any sliding
	// second (its own quota). Default DefaultSetQuota; negative means
	// unlimited.
	SetQuota int `json:"set_quota"`
	// CustomTags are the custom tags configured in the app; a call asking
	// for any other custom tag is refused whole with 40009. Nil means
	// DefaultCustomTags.
	CustomTags []string `json:"custom_tags,omitempty"`
	// UnreadableTags are configured tags the admin may not read: a call
	// asking for one is refused whole with 40007.
	UnreadableTags []string `json:"unreadable_tags,omitempty"`
	// NoStandardData and NoCustomData are accounts that exist but hold no
	// standard (no custom) profile data: their item fails with 40807 when
	// the call asks for a standard tag, else with 40809 when it asks for a
	// custom tag of an account in NoCustomData.
	NoStandardData []string `json:"no_standard_data,omitempty"`
	NoCustomData   []string `json:"no_custom_data,omitempty"`
	// RejectAccounts are account ids the upstream refuses to read: a call
	// naming one fails whole with RejectCode (default DefaultRejectCode), as for an id
	// it cannot unpack.
	RejectAccounts []string `json:"reject_accounts,omitempty"`
	RejectCode     int      `json:"reject_code,omitempty"`
	// APIQuota is the number of calls accepted in any sliding second by
	// each of the other APIs (account_import, sendmsg, …), each its own.
	// Default DefaultAPIQuota; negative means unlimited.
	APIQuota int `json:"api_quota"`
}

// Faults are failures and delays injected on demand. Fractions are in [0,1].
type Faults struct {
	Latency       time.Duration `json:"latency"`         // added to every answer
	Jitter        time.Duration `json:"jitter"`          // uniform extra in [0, Jitter)
	Fail502       float64       `json:"fail_502"`        // calls answered HTTP 502
	Timeout       float64       `json:"timeout"`         // calls never answered until TimeoutAfter
	TimeoutAfter  time.Duration `json:"timeout_after"`   // default 30s; the client usually gives up first
	ItemInternal  float64       `json:"item_internal"`   // accounts whose item fails with 40006
	CallErrorCode int           `json:"call_error_code"` // non-zero: every call fails with this code
	// Drop is the part of calls to other APIs (not portrait_get or
	// portrait_set) whose connection is closed after the request was read,
	// without an answer: the caller cannot tell whether it was applied.
	Drop float64 `json:"drop"`
}

// Stats is what the emulator saw. Times are since the last Reset.
type Stats struct {
	Calls           int64 `json:"calls"`                // portrait_get HTTP requests received
	Accepted        int64 `json:"accepted"`             // within the quota
	Throttled       int64 `json:"throttled"`            // answered with the throttle code
	AuthFailures    int64 `json:"auth_failures"`        // bad query or UserSig
	Rejected        int64 `json:"rejected"`             // bad body, too many accounts, bad tags
	Fail502         int64 `json:"fail_502"`             // injected 502s
	Timeouts        int64 `json:"timeouts"`             // injected timeouts
	Served          int64 `json:"served"`               // answered with ErrorCode 0
	Accounts        int64 `json:"accounts"`             // accounts in served calls
	MaxAccounts     int   `json:"max_accounts"`         // most accounts in one call received
	DistinctFetched int   `json:"distinct_fetched"`     // distinct accounts in served calls
	MaxCallsPerSec  int   `json:"max_calls_per_sec"`    // most calls received in any sliding second
	MaxAcceptPerSec int   `json:"max_accepted_per_sec"` // most calls accepted in any sliding second
	Sets            int64 `json:"sets"`                 // successful portrait_set calls
	SetThrottled    int64 `json:"set_throttled"`        // portrait_set calls over the set quota
	ClientSets      int64 `json:"client_sets"`          // changes made by "client SDKs" (ClientSet)
	CallbacksSent   int64 `json:"callbacks_sent"`       // change callbacks delivered (HTTP 200)
	CallbackErrors  int64 `json:"callback_errors"`      // deliveries that failed or were refused
	Other           int64 `json:"other"`                // calls to other APIs (see Seen)
	OtherThrottled  int64 `json:"other_throttled"`      // of those, over their API's quota
	Dropped         int64 `json:"dropped"`              // of those, connections dropped (Faults.Drop)
	Imported        int64 `json:"imported"`             // accounts imported by account_import/multiaccount_import
	Deleted         int64 `json:"deleted"`              // accounts deleted by account_delete
}

// AccountsPerCall is the mean number of accounts in served calls.
func (s Stats) AccountsPerCall() float64 {
	if s.Served == 0 {
		return 0
	}
	return float64(s.Accounts) / float64(s.Served)
}

// Call is one portrait_get call in the log: when it arrived and whether it
// was accepted within the quota.
type Call struct {
	At       time.Time
	Accepted bool
}

// maxLog caps the call log; older entries are dropped.
const maxLog = 1 << 20

// Server is the emulator. Create it with New.
type Server struct {
	cfg Config

	mu        sync.Mutex
	behaviour Behaviour
	faults    Faults
	rng       *rand.Rand
	overlay   map[string]map[string]json.RawMessage // writes from portrait_set / Put; imported accounts
	deleted   map[string]bool                       // seeded accounts deleted by account_delete
	apiCalls  map[string]*window                    // other APIs' quota windows, by path
	seen      []Seen
	stats     Stats
	fetched   map[string]int
	arrivals  window
	accepts   window
	sets      window
	log       []Call
	mux       *http.ServeMux
	cb        callbacks
}

// New returns a Server with cfg's defaults filled in.
func New(cfg Config) *Server {
	if cfg.SDKAppID == 0 {
		cfg.SDKAppID = DefaultSDKAppID
	}
	if cfg.Identifier == "" {
		cfg.Identifier = im.DefaultAdministrator
	}
	if cfg.Key == "" {
		cfg.Key = "imsim-secret-key"
	}
	if cfg.Accounts == 0 {
		cfg.Accounts = DefaultAccounts
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	s := &Server{
		cfg:      cfg,
		rng:      rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15)),
		overlay:  map[string]map[string]json.RawMessage{},
		deleted:  map[string]bool{},
		apiCalls: map[string]*window{},
		fetched:  map[string]int{},
	}
	s.setBehaviour(cfg.Behaviour)
	s.setFaults(cfg.Faults)
	s.cb.init(cfg.Callback)
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("POST "+im.PathGet, s.portraitGet)
	s.mux.HandleFunc("POST "+im.PathSet, s.portraitSet)
	s.mux.HandleFunc("GET /imsim/stats", s.serveStats)
	s.mux.HandleFunc("POST /imsim/reset", func(w http.ResponseWriter, r *http.Request) { s.Reset(); w.WriteHeader(http.StatusNoContent) })
	s.mux.HandleFunc("POST /imsim/config", s.serveConfig)
	s.mux.HandleFunc("POST /imsim/client_set", s.serveClientSet)
	s.mux.HandleFunc("/v4/", s.serveOther)
	return s
}

// SDKAppID, Identifier and Key describe the emulated app, for clients.
func (s *Server) SDKAppID() uint64   { return s.cfg.SDKAppID }
func (s *Server) Identifier() string { return s.cfg.Identifier }
func (s *Server) Key() string        { return s.cfg.Key }

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func (s *Server) setBehaviour(b Behaviour) {
	if b.Quota == 0 {
		b.Quota = DefaultQuota
	}
	if b.ThrottleCode == 0 {
		b.ThrottleCode = DefaultThrottleCode
	}
	if b.MaxAccounts == 0 {
		b.MaxAccounts = im.MaxAccountsPerCall
	}
	if b.SetQuota == 0 {
		b.SetQuota = DefaultSetQuota
	}
	if b.CustomTags == nil {
		b.CustomTags = DefaultCustomTags
	}
	if b.RejectCode == 0 {
		b.RejectCode = DefaultRejectCode
	}
	if b.APIQuota == 0 {
		b.APIQuota = DefaultAPIQuota
	}
	s.behaviour = b
}

func (s *Server) setFaults(f Faults) {
	if f.TimeoutAfter == 0 {
		f.TimeoutAfter = 30 * time.Second
	}
	s.faults = f
}

// SetBehaviour replaces the behaviour switches (zero fields take defaults).
func (s *Server) SetBehaviour(b Behaviour) { s.mu.Lock(); s.setBehaviour(b); s.mu.Unlock() }

// SetFaults replaces the injected faults.
func (s *Server) SetFaults(f Faults) { s.mu.Lock(); s.setFaults(f); s.mu.Unlock() }

// Stats returns a snapshot of what the emulator saw.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.DistinctFetched = len(s.fetched)
	return st
}

func (s *Server) record(c Call) {
	if len(s.log) >= maxLog {
		s.log = append(s.log[:0], s.log[maxLog/2:]...)
	}
	s.log = append(s.log, c)
}

// Log returns the calls that passed authentication since the last Reset,
// in arrival order, each marked accepted or throttled.
func (s *Server) Log() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.log...)
}

// FetchCount returns how many times account was served since the last Reset.
func (s *Server) FetchCount(account string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fetched[account]
}

// Reset clears the statistics (not the data, behaviour or faults).
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats = Stats{}
	s.fetched = map[string]int{}
	s.arrivals = window{}
	s.sets = window{}
	s.accepts = window{}
	s.log = nil
	s.seen = nil
	clear(s.apiCalls)
}

// Put sets an account's tag to raw JSON as portrait_set would, without a
// call and without checks. It lets tests plant values of any type.
func (s *Server) Put(account, tag string, raw json.RawMessage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.put(account, tag, raw)
}

func (s *Server) put(account, tag string, raw json.RawMessage) {
	m := s.overlay[account]
	if m == nil {
		m = map[string]json.RawMessage{}
		s.overlay[account] = m
	}
	m[tag] = raw
}

// Value returns account's current value of tag, and whether it is set.
func (s *Server) Value(account, tag string) (json.RawMessage, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.value(account, tag)
}

func (s *Server) value(account, tag string) (json.RawMessage, bool) {
	if v, ok := s.overlay[account][tag]; ok {
		return v, len(v) > 0
	}
	return SeededValue(account, tag)
}

// Exists reports whether account exists in the emulated app.
func (s *Server) Exists(account string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.existsLocked(account)
}

// window counts events in the last second and remembers the most it held.
type window struct {
	times []time.Time
	max   int
}

func (w *window) prune(now time.Time) {
	cut := 0
	for cut < len(w.times) && now.Sub(w.times[cut]) >= time.Second {
		cut++
	}
	w.times = w.times[cut:]
}

// count returns how many events lie in (now-1s, now].
func (w *window) count(now time.Time) int { w.prune(now); return len(w.times) }

func (w *window) add(now time.Time) int {
	w.prune(now)
	w.times = append(w.times, now)
	w.max = max(w.max, len(w.times))
	return len(w.times)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func fail(code int, info string) *im.GetResponse {
	return &im.GetResponse{ActionStatus: im.StatusFail, ErrorCode: code, ErrorInfo: info}
}

// checkQuery validates the common query parameters and the UserSig, as the
// real service does, and returns an error envelope or nil.
func (s *Server) checkQuery(r *http.Request) *im.GetResponse {
	q := r.URL.Query()
	appStr := q.Get("sdkappid")
	if appStr == "" {
		return fail(im.CodeSDKAppIDMissing, "sdkappid is missing")
	}
	app, err := strconv.ParseUint(appStr, 10, 64)
	if err != nil || app != s.cfg.SDKAppID {
		return fail(im.CodeSDKAppIDInvalid, "sdkappid is invalid")
	}
	if ct := q.Get("contenttype"); ct != "" && ct != "json" {
		return fail(im.CodeHTTPParse, "contenttype must be json")
	}
	if _, err := strconv.ParseUint(q.Get("random"), 10, 32); err != nil {
		return fail(im.CodeHTTPParse, "random must be a uint32")
	}
	id := q.Get("identifier")
	if _, err := usersig.Verify(q.Get("usersig"), s.cfg.Key, s.cfg.SDKAppID, id, time.Now()); err != nil {
		return fail(usersig.Code(err), err.Error())
	}
	if id != s.cfg.Identifier {
		return fail(im.CodeNeedAdmin, "identifier is not an app admin")
	}
	return nil
}

// drawLocked draws a call's injected latency (with jitter) and whether it
// fails with a 502, in that order of the random source; s.mu is held.
func (s *Server) drawLocked(f Faults) (time.Duration, bool) {
	d := f.Latency
	if f.Jitter > 0 {
		d += time.Duration(s.rng.Int64N(int64(f.Jitter)))
	}
	return d, f.Fail502 > 0 && s.rng.Float64() < f.Fail502
}

// portraitGet serves v4/profile/portrait_get. An injected 502 or timeout
// stands for a gateway failing before the backend: the call is counted as
// received but not processed.
func (s *Server) portraitGet(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	now := time.Now() // read under the lock: the windows need times in order
	s.stats.Calls++
	s.stats.MaxCallsPerSec = max(s.stats.MaxCallsPerSec, s.arrivals.add(now))
	f, b := s.faults, s.behaviour
	d, is502 := s.drawLocked(f)
	isTimeout := !is502 && f.Timeout > 0 && s.rng.Float64() < f.Timeout
	switch {
	case is502:
		s.stats.Fail502++
	case isTimeout:
		s.stats.Timeouts++
		d = f.TimeoutAfter
	}
	s.mu.Unlock()

	var resp *im.GetResponse
	if !is502 && !isTimeout {
		resp = s.get(r, b, f)
	}
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	switch {
	case is502:
		http.Error(w, "502 Bad Gateway", http.StatusBadGateway)
	case isTimeout:
		http.Error(w, "504 Gateway Timeout", http.StatusGatewayTimeout)
	default:
		w.Header().Set("Content-Type", "application/json")
		w.Write(resp.AppendJSON(nil))
	}
}

// get decides the answer of one portrait_get call, recording it in Stats.
func (s *Server) get(r *http.Request, b Behaviour, f Faults) *im.GetResponse {
	if e := s.checkQuery(r); e != nil {
		s.count(func(st *Stats) { st.AuthFailures++ })
		return e
	}
	if e := s.accept(b); e != nil {
		return e
	}
	accounts, tags, e := s.readGet(r, b)
	if e == nil {
		e = refuseGet(accounts, tags, b)
	}
	if e != nil {
		s.count(func(st *Stats) { st.Rejected++ })
		return e
	}
	if f.CallErrorCode != 0 {
		return fail(f.CallErrorCode, "injected call error")
	}
	if b.MissingFailsCall {
		for _, a := range accounts {
			if !s.Exists(a) {
				return fail(im.CodeAccountNotFound, "account does not exist: "+a)
			}
		}
	}
	return s.answerGet(accounts, tags, b, f)
}

// accept counts a call against the quota: a throttling answer when the
// last second already holds Quota accepted calls, nil when accepted.
func (s *Server) accept(b Behaviour) *im.GetResponse {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now() // under the lock, so accepted times are in order
	if b.Quota > 0 && s.accepts.count(now) >= b.Quota {
		s.stats.Throttled++
		s.record(Call{At: now})
		return fail(b.ThrottleCode, "REST API call frequency limit exceeded")
	}
	s.stats.Accepted++
	s.stats.MaxAcceptPerSec = max(s.stats.MaxAcceptPerSec, s.accepts.add(now))
	s.record(Call{At: now, Accepted: true})
	return nil
}

// readGet reads a call's accounts and tags (tags deduplicated), or the
// answer refusing a malformed body.
func (s *Server) readGet(r *http.Request, b Behaviour) (accounts, tags []string, e *im.GetResponse) {
	raw, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return nil, nil, fail(im.CodeHTTPParse, "read body: "+err.Error())
	}
	var body struct {
		ToAccount []json.RawMessage `json:"To_Account"`
		TagList   []json.RawMessage `json:"TagList"`
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		return nil, nil, fail(im.CodeJSONParse, "json parse error: "+err.Error())
	}
	s.count(func(st *Stats) { st.MaxAccounts = max(st.MaxAccounts, len(body.ToAccount)) })
	if len(body.ToAccount) == 0 {
		return nil, nil, fail(im.CodeNoAccount, "To_Account is empty")
	}
	if len(body.ToAccount) > b.MaxAccounts {
		return nil, nil, fail(im.CodeBadRequest, fmt.Sprintf("To_Account has %d accounts, more than %d", len(body.ToAccount), b.MaxAccounts))
	}
	accounts, ok := stringList(body.ToAccount)
	if !ok {
		return nil, nil, fail(im.CodeAccountType, "To_Account holds a value that is not a string")
	}
	tags, ok = stringList(body.TagList)
	if !ok || len(tags) == 0 {
		return nil, nil, fail(im.CodeBadRequest, "TagList is missing or holds a value that is not a string")
	}
	if len(tags) > im.MaxTagsPerCall {
		return nil, nil, fail(im.CodeBadRequest, fmt.Sprintf("TagList has %d entries, more than %d", len(tags), im.MaxTagsPerCall))
	}
	return accounts, im.DedupTags(tags), nil // each tag answered once
}

// refuseGet is the whole-call refusal the behaviour plays for these tags
// and accounts (an invalid, unknown or unreadable tag, a rejected
// account), or nil.
func refuseGet(accounts, tags []string, b Behaviour) *im.GetResponse {
	for _, t := range tags {
		if !im.ValidTag(t) {
			return fail(im.CodeInvalidTag, "invalid tag "+t)
		}
		if !b.knownTag(t) {
			return fail(im.CodeTagNotExist, "tag does not exist: "+t)
		}
		if slices.Contains(b.UnreadableTags, t) {
			return fail(im.CodeTagNoPermission, "no permission to read tag: "+t)
		}
	}
	for _, a := range accounts {
		if slices.Contains(b.RejectAccounts, a) {
			return fail(b.RejectCode, "cannot read account: "+strconv.Quote(a))
		}
	}
	return nil
}

// answerGet is the answer of an accepted call: an item per account, with
// the per-account failures the behaviour and faults play.
func (s *Server) answerGet(accounts, tags []string, b Behaviour, f Faults) *im.GetResponse {
	classes := im.ClassesOf(tags)
	resp := &im.GetResponse{ActionStatus: im.StatusOK, UserProfileItem: make([]im.UserProfile, 0, len(accounts))}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range accounts {
		item := im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}}
		switch {
		case !s.existsLocked(a):
			item.ResultCode, item.ResultInfo = im.CodeAccountNotFound, "account does not exist"
			resp.FailAccount = append(resp.FailAccount, a)
		case f.ItemInternal > 0 && s.rng.Float64() < f.ItemInternal:
			item.ResultCode, item.ResultInfo = im.CodeInternal, "internal error, retry"
			resp.FailAccount = append(resp.FailAccount, a)
		case classes&im.ClassStandard != 0 && slices.Contains(b.NoStandardData, a):
			item.ResultCode, item.ResultInfo = im.CodeNoStdData, "no standard profile data for this account"
			resp.FailAccount = append(resp.FailAccount, a)
		case classes&im.ClassCustom != 0 && slices.Contains(b.NoCustomData, a):
			item.ResultCode, item.ResultInfo = im.CodeNoCustomData, "no custom profile data for this account"
			resp.FailAccount = append(resp.FailAccount, a)
		default:
			item.ProfileItem = s.itemsLocked(a, tags, b.UnsetAsEmpty)
		}
		resp.UserProfileItem = append(resp.UserProfileItem, item)
		s.fetched[a]++
	}
	s.stats.Served++
	s.stats.Accounts += int64(len(accounts))
	return resp
}

// itemsLocked is account's value of each tag: the tags set, and with
// unsetAsEmpty the others as empty values. s.mu is held.
func (s *Server) itemsLocked(account string, tags []string, unsetAsEmpty bool) []im.ProfileItem {
	items := []im.ProfileItem{}
	for _, t := range tags {
		v, set := s.value(account, t)
		switch {
		case set:
			items = append(items, im.ProfileItem{Tag: t, Value: v})
		case unsetAsEmpty:
			empty := json.RawMessage(`""`)
			if numericTags[t] {
				empty = json.RawMessage(`0`)
			}
			items = append(items, im.ProfileItem{Tag: t, Value: empty})
		}
	}
	return items
}

func (s *Server) existsLocked(account string) bool {
	if s.deleted[account] {
		return false
	}
	if i := seededIndex(account); i >= 0 && i < s.cfg.Accounts {
		return true
	}
	if slices.Contains(s.behaviour.NoStandardData, account) || slices.Contains(s.behaviour.NoCustomData, account) {
		return true
	}
	_, ok := s.overlay[account]
	return ok
}

func (s *Server) count(f func(*Stats)) { s.mu.Lock(); f(&s.stats); s.mu.Unlock() }

func stringList(raws []json.RawMessage) ([]string, bool) {
	out := make([]string, len(raws))
	for i, r := range raws {
		if err := json.Unmarshal(r, &out[i]); err != nil {
			return nil, false
		}
	}
	return out, true
}

// portraitSet serves v4/profile/portrait_set.
func (s *Server) portraitSet(w http.ResponseWriter, r *http.Request) {
	if e := s.checkQuery(r); e != nil {
		s.count(func(st *Stats) { st.AuthFailures++ })
		writeJSON(w, im.Envelope{ActionStatus: e.ActionStatus, ErrorCode: e.ErrorCode, ErrorInfo: e.ErrorInfo})
		return
	}
	s.mu.Lock()
	is502 := s.faults.Fail502 > 0 && s.rng.Float64() < s.faults.Fail502
	if is502 {
		s.stats.Fail502++
	}
	s.mu.Unlock()
	if is502 { // a gateway failing before the backend: nothing applied
		http.Error(w, "502 Bad Gateway", http.StatusBadGateway)
		return
	}
	var req im.SetRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		writeJSON(w, im.Envelope{ActionStatus: im.StatusFail, ErrorCode: im.CodeBadRequest, ErrorInfo: "bad request: " + err.Error()})
		return
	}
	if req.FromAccount == "" || !s.Exists(req.FromAccount) {
		writeJSON(w, im.Envelope{ActionStatus: im.StatusFail, ErrorCode: im.CodeAccountNotFound, ErrorInfo: "account does not exist"})
		return
	}
	s.mu.Lock()
	b := s.behaviour
	s.mu.Unlock()
	for _, it := range req.ProfileItem {
		if !b.knownTag(it.Tag) {
			writeJSON(w, im.Envelope{ActionStatus: im.StatusFail, ErrorCode: im.CodeTagNotExist, ErrorInfo: "tag does not exist: " + it.Tag})
			return
		}
		if numericTags[it.Tag] {
			if _, err := strconv.ParseUint(string(it.Value), 10, 64); err != nil {
				writeJSON(w, im.Envelope{ActionStatus: im.StatusFail, ErrorCode: im.CodeBadRequest, ErrorInfo: it.Tag + " takes a number"})
				return
			}
		}
	}
	s.mu.Lock()
	if q := s.behaviour.SetQuota; q > 0 && s.sets.count(time.Now()) >= q {
		s.stats.SetThrottled++
		code := s.behaviour.ThrottleCode
		s.mu.Unlock()
		writeJSON(w, im.Envelope{ActionStatus: im.StatusFail, ErrorCode: code, ErrorInfo: "portrait_set frequency limit"})
		return
	}
	s.sets.add(time.Now())
	s.stats.Sets++
	s.change(req.FromAccount, req.ProfileItem, "RESTAPI", s.cfg.Identifier)
	s.mu.Unlock()
	writeJSON(w, im.Envelope{ActionStatus: im.StatusOK})
}

func (s *Server) serveStats(w http.ResponseWriter, r *http.Request) {
	st := s.Stats()
	writeJSON(w, struct {
		Stats
		AccountsPerCall float64 `json:"accounts_per_call"`
	}{st, st.AccountsPerCall()})
}

// serveConfig replaces behaviour and faults from a JSON body
// {"behaviour":{…},"faults":{…}}; durations are in nanoseconds.
func (s *Server) serveConfig(w http.ResponseWriter, r *http.Request) {
	var c struct {
		Behaviour *Behaviour `json:"behaviour"`
		Faults    *Faults    `json:"faults"`
		Callback  *Callback  `json:"callback"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&c); err != nil {
		http.Error(w, "bad config: "+err.Error(), http.StatusBadRequest)
		return
	}
	if c.Behaviour != nil {
		s.SetBehaviour(*c.Behaviour)
	}
	if c.Faults != nil {
		s.SetFaults(*c.Faults)
	}
	if c.Callback != nil {
		s.SetCallback(*c.Callback)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cb := s.cb.cfg
	cb.Token = "" // never echoed
	writeJSON(w, struct {
		Behaviour Behaviour `json:"behaviour"`
		Faults    Faults    `json:"faults"`
		Callback  Callback  `json:"callback"`
	}{s.behaviour, s.faults, cb})
}
