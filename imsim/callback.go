package imsim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// Callback is where and how the emulator sends Profile.CallbackPortraitSet
// after every successful change (a portrait_set, or a client's change made
// with ClientSet), as IM does. Delivery is asynchronous; Delay, Jitter and
// Duplicate make it late, out of order and repeated, as an at-least-once
// delivery may be.
type Callback struct {
	URL       string        `json:"url"`       // empty: no callbacks
	Token     string        `json:"token"`     // non-empty: signed with Sign and RequestTime in the URL
	Delay     time.Duration `json:"delay"`     // before each delivery
	Jitter    time.Duration `json:"jitter"`    // uniform extra delay in [0, Jitter): later events may arrive first
	Duplicate float64       `json:"duplicate"` // fraction of callbacks delivered twice
}

// CallbackEvent is the body of a change callback.
type CallbackEvent struct {
	CallbackCommand string           `json:"CallbackCommand"`
	OperatorAccount string           `json:"Operator_Account"`
	FromAccount     string           `json:"From_Account"`
	EventTime       int64            `json:"EventTime"`
	ProfileItem     []im.ProfileItem `json:"ProfileItem"`
}

type callbacks struct {
	cfg       Callback
	client    *http.Client
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	lastEvent int64
}

func (c *callbacks) init(cfg Callback) {
	c.cfg = cfg
	c.client = &http.Client{Timeout: 5 * time.Second}
	c.ctx, c.cancel = context.WithCancel(context.Background())
}

// SetCallback replaces the callback settings.
func (s *Server) SetCallback(cb Callback) { s.mu.Lock(); s.cb.cfg = cb; s.mu.Unlock() }

// Close stops callback deliveries still waiting and waits for those under
// way. The Server still answers calls (without callbacks) afterwards.
func (s *Server) Close() {
	s.mu.Lock()
	s.cb.cancel()
	s.mu.Unlock()
	s.cb.wg.Wait()
}

// ClientSet changes account's tags as a client SDK would (not through the
// REST API): no quota, and the change callback names the account itself as
// the operator.
func (s *Server) ClientSet(account string, items []im.ProfileItem) error {
	if !s.Exists(account) {
		return fmt.Errorf("imsim: no account %q", account)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, it := range items {
		if !s.behaviour.knownTag(it.Tag) {
			return fmt.Errorf("imsim: unknown tag %q", it.Tag)
		}
	}
	s.stats.ClientSets++
	s.change(account, items, "iOS", account)
	return nil
}

func (s *Server) serveClientSet(w http.ResponseWriter, r *http.Request) {
	var req im.SetRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		http.Error(w, "bad body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if err := s.ClientSet(req.FromAccount, req.ProfileItem); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// change applies items and schedules the callback. s.mu is held. Event
// times are Unix milliseconds, strictly increasing, so every change has its
// own.
func (s *Server) change(account string, items []im.ProfileItem, platform, operator string) {
	for _, it := range items {
		s.put(account, it.Tag, it.Value)
	}
	cb := s.cb.cfg
	if cb.URL == "" || s.cb.ctx.Err() != nil {
		return
	}
	ev := CallbackEvent{CallbackCommand: im.CallbackCommand, OperatorAccount: operator, FromAccount: account,
		EventTime: max(time.Now().UnixMilli(), s.cb.lastEvent+1), ProfileItem: append([]im.ProfileItem(nil), items...)}
	s.cb.lastEvent = ev.EventTime
	body, _ := json.Marshal(ev)
	n := 1
	if cb.Duplicate > 0 && s.rng.Float64() < cb.Duplicate {
		n = 2
	}
	for range n {
		delay := cb.Delay
		if cb.Jitter > 0 {
			delay += time.Duration(s.rng.Int64N(int64(cb.Jitter)))
		}
		s.cb.wg.Add(1)
		go s.deliver(cb, platform, body, delay)
	}
}

func (s *Server) deliver(cb Callback, platform string, body []byte, delay time.Duration) {
	defer s.cb.wg.Done()
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-s.cb.ctx.Done():
			t.Stop()
			return
		}
	}
	q := url.Values{}
	q.Set("SdkAppid", strconv.FormatUint(s.cfg.SDKAppID, 10))
	q.Set("CallbackCommand", im.CallbackCommand)
	q.Set("contenttype", "json")
	q.Set("ClientIP", "127.0.0.1")
	q.Set("OptPlatform", platform)
	if cb.Token != "" {
		rt := strconv.FormatInt(time.Now().Unix(), 10)
		q.Set("RequestTime", rt)
		q.Set("Sign", im.CallbackSign(cb.Token, rt))
	}
	ok := false
	req, err := http.NewRequestWithContext(s.cb.ctx, http.MethodPost, cb.URL+"?"+q.Encode(), bytes.NewReader(body))
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
		var resp *http.Response
		if resp, err = s.cb.client.Do(req); err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			ok = resp.StatusCode == http.StatusOK
		}
	}
	s.count(func(st *Stats) {
		if ok {
			st.CallbacksSent++
		} else {
			st.CallbackErrors++
		}
	})
}
