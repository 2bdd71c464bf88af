package imsim

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// Paths of the account calls the emulator plays.
const (
	PathAccountImport      = "/v4/im_open_login_svc/account_import"
	PathMultiAccountImport = "/v4/im_open_login_svc/multiaccount_import"
	PathAccountDelete      = "/v4/im_open_login_svc/account_delete"
)

// Seen is one call to an API other than portrait_get and portrait_set, as
// the emulator received and answered it (the account calls included).
type Seen struct {
	At          time.Time
	Method      string
	Path        string
	RawQuery    string
	Identifier  string // the query's identifier
	UserSig     string // the query's usersig, to check whose credentials came
	ContentType string
	Body        []byte // the request body as received
	Status      int    // HTTP status answered; 0 when the connection was dropped
	Answer      []byte // the body answered
}

// maxSeen caps the log of other calls; older entries are dropped.
const maxSeen = 1 << 14

// Seen returns the calls to other APIs since the last Reset, in arrival
// order.
func (s *Server) Seen() []Seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Seen(nil), s.seen...)
}

func (s *Server) recordSeen(c Seen) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.seen) >= maxSeen {
		s.seen = append(s.seen[:0], s.seen[maxSeen/2:]...)
	}
	s.seen = append(s.seen, c)
}

// Import creates account as account_import would (nick and face, when not
// empty, set Tag_Profile_IM_Nick and Tag_Profile_IM_Image), without a call.
func (s *Server) Import(account, nick, face string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.importLocked(account, nick, face)
}

func (s *Server) importLocked(account, nick, face string) {
	delete(s.deleted, account)
	if s.overlay[account] == nil {
		s.overlay[account] = map[string]json.RawMessage{}
	}
	if nick != "" {
		s.put(account, "Tag_Profile_IM_Nick", jsonString(nick))
	}
	if face != "" {
		s.put(account, "Tag_Profile_IM_Image", jsonString(face))
	}
}

// Delete removes account and its profile, as account_delete would; it
// reports whether the account existed.
func (s *Server) Delete(account string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deleteLocked(account)
}

func (s *Server) deleteLocked(account string) bool {
	if !s.existsLocked(account) {
		return false
	}
	delete(s.overlay, account)
	s.deleted[account] = true
	return true
}

// serveOther serves every /v4/ API but portrait_get and portrait_set: the
// account calls with their real effects and answers, any other command
// with a generic OK envelope. Each is checked like the real service (the
// query and the caller's own UserSig, which must be an admin's), held to
// Behaviour.APIQuota calls a second per API, subject to the injected
// latency, 502s and dropped connections, and recorded in Seen.
func (s *Server) serveOther(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	seen := Seen{At: time.Now(), Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Identifier: q.Get("identifier"),
		UserSig: q.Get("usersig"), ContentType: r.Header.Get("Content-Type")}
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	seen.Body = body
	s.mu.Lock()
	s.stats.Other++
	f, b := s.faults, s.behaviour
	d, is502 := s.drawLocked(f)
	drop := !is502 && f.Drop > 0 && s.rng.Float64() < f.Drop
	switch {
	case is502:
		s.stats.Fail502++
	case drop:
		s.stats.Dropped++
	}
	s.mu.Unlock()
	if drop {
		// The request was read and then the connection dies: the client
		// cannot know whether the call was applied. Recorded before the
		// connection closes, so a caller that sees the error sees the record.
		s.recordSeen(seen)
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	defer func() { s.recordSeen(seen) }()
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if is502 {
		seen.Status, seen.Answer = http.StatusBadGateway, []byte("502 Bad Gateway\n")
		http.Error(w, "502 Bad Gateway", http.StatusBadGateway)
		return
	}
	var answer any
	switch {
	case r.Method != http.MethodPost:
		answer = failEnvelope(im.CodeHTTPParse, "the REST API takes POST")
	case err != nil:
		answer = failEnvelope(im.CodeHTTPParse, "read body: "+err.Error())
	default:
		if e := s.checkQuery(r); e != nil {
			s.count(func(st *Stats) { st.AuthFailures++ })
			answer = im.Envelope{ActionStatus: e.ActionStatus, ErrorCode: e.ErrorCode, ErrorInfo: e.ErrorInfo}
		} else if !s.admitAPI(r.URL.Path, b) {
			answer = failEnvelope(b.ThrottleCode, "REST API call frequency limit exceeded")
		} else {
			answer = s.answerOther(r.URL.Path, body)
		}
	}
	out, _ := json.Marshal(answer)
	seen.Status, seen.Answer = http.StatusOK, out
	w.Header().Set("Content-Type", "application/json")
	w.Write(out)
}

func failEnvelope(code int, info string) im.Envelope {
	return im.Envelope{ActionStatus: im.StatusFail, ErrorCode: code, ErrorInfo: info}
}

// admitAPI counts a call against path's own quota and reports whether it
// is within it.
func (s *Server) admitAPI(path string, b Behaviour) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if b.APIQuota < 0 {
		return true
	}
	now := time.Now()
	w := s.apiCalls[path]
	if w == nil {
		if len(s.apiCalls) >= 1024 { // bounded whatever paths callers invent
			clear(s.apiCalls)
		}
		w = &window{}
		s.apiCalls[path] = w
	}
	if w.count(now) >= b.APIQuota {
		s.stats.OtherThrottled++
		return false
	}
	w.add(now)
	return true
}

// accountResult is one item of account_delete's ResultItem.
type accountResult struct {
	ResultCode int    `json:"ResultCode"`
	ResultInfo string `json:"ResultInfo"`
	UserID     string `json:"UserID"`
}

// answerOther applies an authenticated call within its quota and returns
// its answer.
func (s *Server) answerOther(path string, body []byte) any {
	switch path {
	case PathAccountImport:
		// UserID is today's field; Identifier the older one, still sent by
		// some SDKs.
		var req struct{ UserID, Identifier, Nick, FaceUrl string }
		if json.Unmarshal(body, &req) != nil {
			return failEnvelope(im.CodeJSONParse, "request body is not valid JSON")
		}
		id := req.UserID
		if id == "" {
			id = req.Identifier
		}
		if !validID(id) {
			return failEnvelope(im.CodeBadRequest, "UserID must be 1-32 bytes")
		}
		s.Import(id, req.Nick, req.FaceUrl)
		s.count(func(st *Stats) { st.Imported++ })
		return im.Envelope{ActionStatus: im.StatusOK}
	case PathMultiAccountImport:
		// Accounts is the older form; AccountList the newer one, with
		// nicknames and faces.
		var req struct {
			Accounts    []string
			AccountList []struct{ UserID, Nick, FaceUrl string }
		}
		if json.Unmarshal(body, &req) != nil {
			return failEnvelope(im.CodeJSONParse, "request body is not valid JSON")
		}
		for _, a := range req.Accounts {
			req.AccountList = append(req.AccountList, struct{ UserID, Nick, FaceUrl string }{UserID: a})
		}
		if len(req.AccountList) == 0 || len(req.AccountList) > 100 {
			return failEnvelope(im.CodeBadRequest, "Accounts must hold 1-100 accounts")
		}
		fails := []string{}
		s.mu.Lock()
		for _, a := range req.AccountList {
			if !validID(a.UserID) {
				fails = append(fails, a.UserID)
				continue
			}
			s.importLocked(a.UserID, a.Nick, a.FaceUrl)
			s.stats.Imported++
		}
		s.mu.Unlock()
		return struct {
			im.Envelope
			FailAccounts []string `json:"FailAccounts"`
		}{im.Envelope{ActionStatus: im.StatusOK}, fails}
	case PathAccountDelete:
		var req struct{ DeleteItem []struct{ UserID string } }
		if json.Unmarshal(body, &req) != nil {
			return failEnvelope(im.CodeJSONParse, "request body is not valid JSON")
		}
		if len(req.DeleteItem) == 0 || len(req.DeleteItem) > 100 {
			return failEnvelope(im.CodeBadRequest, "DeleteItem must hold 1-100 items")
		}
		items := make([]accountResult, 0, len(req.DeleteItem))
		s.mu.Lock()
		for _, it := range req.DeleteItem {
			res := accountResult{UserID: it.UserID}
			if s.deleteLocked(it.UserID) {
				s.stats.Deleted++
			} else {
				res.ResultCode, res.ResultInfo = im.CodeNotImported, "account not imported"
			}
			items = append(items, res)
		}
		s.mu.Unlock()
		return struct {
			im.Envelope
			ResultItem []accountResult `json:"ResultItem"`
		}{im.Envelope{ActionStatus: im.StatusOK}, items}
	default:
		return im.Envelope{ActionStatus: im.StatusOK}
	}
}

// validID reports whether id is a user id the service accepts: 1-32 bytes
// of printable ASCII.
func validID(id string) bool {
	if len(id) == 0 || len(id) > 32 {
		return false
	}
	return !strings.ContainsFunc(id, func(r rune) bool { return r < 0x21 || r > 0x7e })
}
