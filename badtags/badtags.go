// Package badtags remembers, per app, the tags the upstream refuses, so a
// request asking for one is answered at once with the upstream's code and
// never costs a call.
//
// The upstream refuses a whole portrait_get call when one of its tags does
// not exist (40009: a custom tag the app never configured), may not be read
// (40007) or is not a valid name (40801). The batcher isolates such a
// refusal to the callers who asked for the tag and tells a Set which tag it
// was (Learn); from then on, for TTL, Check answers requests naming it
// with the same code before they reach the cache path. A tag is learned
// only from the upstream's own answer, so a tag the app configures later is
// served again at the latest TTL after.
//
// With a Redis client, learned tags are shared: written to one hash per app
// (pp:v2:<sdkappid>:badtags, field = tag, value = code, expiry and the
// upstream's text) and announced on a channel of the same name, so every
// replica learns at once; Run follows the channel and scans the hash
// whenever it (re)subscribes (stopping after Max valid entries). Expired
// and undecodable fields are removed from the hash (by a reload, and by
// the next share of a replica that saw a refusal expire), each only if it
// still holds the value seen. Everything read from Redis is checked as an
// outside input: a malformed entry, a code that is not a tag refusal, a
// refusal the upstream cannot give (40009 or 40801 for a standard tag,
// 40009 for a configured custom tag), a name that is not a tag or an
// expiry past TTL + Skew from now is ignored, and at most Max tags are
// held.
//
// Optionally the app's configured custom tags are given (Custom): then a
// custom tag outside them is answered 40009 locally without learning.
//
// A Set is safe for concurrent use; Check is lock-free. The zero value is
// not usable: create one with New.
package badtags

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// DefaultTTL is Config.TTL's default: how long a learned tag is refused.
const DefaultTTL = 10 * time.Minute

// Config configures a Set. Every field is optional.
type Config struct {
	// Custom, when not nil, lists the custom tags the app configured: any
	// other custom tag is refused with 40009. Nil means learn from the
	// upstream.
	Custom []string
	// TTL is how long a learned tag is refused. Zero means DefaultTTL.
	TTL time.Duration
	// Max bounds the tags remembered. Zero means 1024.
	Max int
	// Client, if set, shares learned tags with every replica on it;
	// SDKAppID is then required (it names the key).
	Client   redis.UniversalClient
	SDKAppID uint64
	// Timeout bounds one Redis command. Zero means 250ms.
	Timeout time.Duration
	// Skew is how far replicas' clocks may be apart: a shared entry whose
	// expiry is more than TTL + Skew from now is dropped as forged. Zero
	// means 1s.
	Skew    time.Duration
	Metrics *metrics.Metrics
	Now     func() time.Time
}

// Refusal is a tag's remembered refusal.
type Refusal struct {
	Code  int
	Info  string
	Until time.Time
}

// maxInfo caps the remembered text of a refusal.
const maxInfo = 200

// Set holds the refused tags of one app.
type Set struct {
	cfg    Config
	m      *metrics.Metrics
	custom map[string]bool // nil: learn
	key    string

	mu      sync.Mutex                         // serialises writers of learned
	learned atomic.Pointer[map[string]Refusal] // immutable; replaced on change
	expired []string                           // field, value pairs this replica saw expire: removed from the hash by the next share (under mu)
	out     chan string                        // tags to share, drained by Run
}

// New validates cfg and returns a Set.
func New(cfg Config) (*Set, error) {
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.Max <= 0 {
		cfg.Max = 1024
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 250 * time.Millisecond
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Skew <= 0 {
		cfg.Skew = time.Second
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.New(prometheus.NewRegistry())
	}
	s := &Set{cfg: cfg, m: cfg.Metrics, out: make(chan string, 64)}
	if cfg.Custom != nil {
		s.custom = map[string]bool{}
		for _, t := range cfg.Custom {
			if !im.ValidTag(t) || im.IsStandardTag(t) {
				return nil, fmt.Errorf("badtags: %q is not a custom tag name (Tag_Profile_Custom_ + 1-8 letters)", t)
			}
			s.custom[t] = true
		}
	}
	if cfg.Client != nil {
		if cfg.SDKAppID == 0 {
			return nil, errors.New("badtags: Config.SDKAppID is required with a Redis client")
		}
		s.key = "pp:v2:" + strconv.FormatUint(cfg.SDKAppID, 10) + ":badtags"
	}
	s.learned.Store(&map[string]Refusal{})
	return s, nil
}

// refusable reports whether code is a refusal of a tag that may be learned.
func refusable(code int) bool {
	switch code {
	case im.CodeTagNotExist, im.CodeTagNoPermission, im.CodeInvalidTag:
		return true
	}
	return false
}

// acceptable reports whether a refusal of tag with code is one the
// upstream can give, and so may be learned (from the upstream or from
// Redis): a tag refusal of a valid tag name, never "does not exist" or
// "invalid name" for a standard tag, and never "does not exist" for a
// custom tag the app configured (Custom).
func (s *Set) acceptable(tag string, code int) bool {
	if !refusable(code) || !im.ValidTag(tag) {
		return false
	}
	if code == im.CodeTagNotExist || code == im.CodeInvalidTag {
		return !im.IsStandardTag(tag) && !(code == im.CodeTagNotExist && s.custom[tag])
	}
	return true
}

// Check returns the refusal of the first tag of tags that is refused: a
// custom tag outside Custom (40009), or a learned tag still within its TTL.
// ok is false when every tag may be asked for.
// Each refusal Check finds is counted in refused_tag_requests_total.
func (s *Set) Check(tags []string) (code int, info string, ok bool) {
	code, info, source := s.check(tags)
	if source == "" {
		return 0, "", false
	}
	s.m.RefusedTags.WithLabelValues(source).Inc()
	return code, info, true
}

// check is Check without counting: source is "" when no tag is refused.
func (s *Set) check(tags []string) (code int, info, source string) {
	learned := *s.learned.Load()
	if s.custom == nil && len(learned) == 0 {
		return 0, "", ""
	}
	now := s.cfg.Now()
	for _, t := range tags {
		if s.custom != nil && !s.custom[t] && !im.IsStandardTag(t) {
			return im.CodeTagNotExist, "tag does not exist: " + t + " (not one of the app's custom tags, -custom-tags)", metrics.RefusedConfigured
		}
		if r, found := learned[t]; found && now.Before(r.Until) {
			return r.Code, "upstream: " + r.Info, metrics.RefusedLearned
		}
	}
	return 0, "", ""
}

// Refused reports whether tag is refused (configured or learned), without
// counting a request.
func (s *Set) Refused(tag string) bool {
	_, _, source := s.check([]string{tag})
	return source != ""
}

// Learn remembers that the upstream refused tag with code and info, for
// TTL, and shares it with the other replicas (through Run). Codes other
// than tag refusals are ignored.
func (s *Set) Learn(tag string, code int, info string) {
	if !s.acceptable(tag, code) {
		return
	}
	if !s.add(tag, Refusal{Code: code, Info: clip(info), Until: s.cfg.Now().Add(s.cfg.TTL)}) {
		return
	}
	if s.key != "" {
		select {
		case s.out <- tag:
		default: // Redis is behind: the others learn from the upstream themselves
		}
	}
}

func clip(info string) string {
	if len(info) > maxInfo {
		info = info[:maxInfo]
	}
	return strings.ToValidUTF8(info, "")
}

// add stores r for tag unless an entry lasting as long is there or the set
// is full; it reports whether it stored.
func (s *Set) add(tag string, r Refusal) bool {
	return s.addAll(map[string]Refusal{tag: r}) > 0
}

// addAll stores each refusal of rs unless an entry lasting as long is
// there or the set is full, in one new map; it returns how many it stored.
// Expired entries are dropped (and, when shared, queued for removal from
// the hash).
func (s *Set) addAll(rs map[string]Refusal) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := *s.learned.Load()
	now := s.cfg.Now()
	live := 0
	for _, v := range old {
		if now.Before(v.Until) {
			live++
		}
	}
	wanted := 0
	for t, r := range rs {
		cur, ok := old[t]
		switch {
		case ok && !cur.Until.Before(r.Until):
		case !(ok && now.Before(cur.Until)) && live+wanted >= s.cfg.Max: // new, and full
		default:
			wanted++
		}
	}
	if wanted == 0 {
		return 0
	}
	next := make(map[string]Refusal, live+wanted)
	for t, v := range old {
		if now.Before(v.Until) {
			next[t] = v
		} else if s.key != "" && len(s.expired) < 2*s.cfg.Max {
			s.expired = append(s.expired, t, encode(v))
		}
	}
	n := 0
	for t, r := range rs {
		cur, ok := next[t]
		if ok && !cur.Until.Before(r.Until) || !ok && len(next) >= s.cfg.Max {
			continue
		}
		next[t] = r
		n++
	}
	s.learned.Store(&next)
	s.m.LearnedTags.Set(float64(len(next)))
	return n
}

// Learned returns the tags learned and still refused, sorted.
func (s *Set) Learned() []string {
	now := s.cfg.Now()
	var out []string
	for t, r := range *s.learned.Load() {
		if now.Before(r.Until) {
			out = append(out, t)
		}
	}
	slices.Sort(out)
	return out
}

// Shared-entry encoding: "<code>|<until, Unix ms>|<info>".
func encode(r Refusal) string {
	return strconv.Itoa(r.Code) + "|" + strconv.FormatInt(r.Until.UnixMilli(), 10) + "|" + r.Info
}

// decode checks an entry read from Redis: a refusal the upstream cannot
// give (acceptable) or one expiring later than TTL + Skew from now (no
// replica writes one: forged) is dropped.
func (s *Set) decode(tag, v string) (Refusal, bool) {
	code, rest, ok1 := strings.Cut(v, "|")
	until, info, ok2 := strings.Cut(rest, "|")
	c, err1 := strconv.Atoi(code)
	u, err2 := strconv.ParseInt(until, 10, 64)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || !s.acceptable(tag, c) {
		return Refusal{}, false
	}
	now := s.cfg.Now()
	r := Refusal{Code: c, Info: clip(info), Until: time.UnixMilli(u)}
	if !now.Before(r.Until) || r.Until.After(now.Add(s.cfg.TTL+s.cfg.Skew)) {
		return Refusal{}, false
	}
	return r, true
}

// Run shares learned tags through Redis until ctx ends: it writes and
// announces what this replica learns, follows what others announce, and
// reads the whole hash when it (re)subscribes. Without a client it returns
// at once. Redis errors are retried; Run returns nil.
func (s *Set) Run(ctx context.Context) error {
	if s.key == "" {
		return nil
	}
	ps := s.cfg.Client.Subscribe(ctx, s.key)
	defer ps.Close()
	msgs := make(chan *redis.Message)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			msg, err := ps.Receive(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				select { // the next Receive reconnects; do not spin while Redis is away
				case <-ctx.Done():
					return
				case <-time.After(250 * time.Millisecond):
				}
				continue
			}
			switch m := msg.(type) {
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					s.reload(ctx)
				}
			case *redis.Message:
				select {
				case msgs <- m:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			ps.Close()
			return nil
		case tag := <-s.out:
			s.share(ctx, tag)
		case m := <-msgs:
			tag, v, _ := strings.Cut(m.Payload, "\x00")
			if r, ok := s.decode(tag, v); ok {
				s.add(tag, r)
			}
		}
	}
}

// share writes tag's refusal to the hash and announces it, in one round trip.
func (s *Set) share(ctx context.Context, tag string) {
	r, ok := (*s.learned.Load())[tag]
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	v := encode(r)
	s.mu.Lock()
	expired := s.expired
	s.expired = nil
	s.mu.Unlock()
	_, err := s.cfg.Client.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, s.key, tag, v)
		p.PExpire(ctx, s.key, s.cfg.TTL)
		p.Publish(ctx, s.key, tag+"\x00"+v)
		if len(expired) > 0 {
			// Eval, not Run: in a pipeline Run cannot fall back from
			// EVALSHA to EVAL, and a Redis that has not seen the script
			// answers NOSCRIPT. Expiries are rare; the script is short.
			dropScript.Eval(ctx, p, []string{s.key}, toAny(expired)...)
		}
		return nil
	})
	if err != nil {
		s.m.RedisErrors.WithLabelValues("badtags").Inc()
	}
}

// dropScript removes field/value pairs from a hash, each only if it still
// holds that value (a newer refusal written since is kept).
var dropScript = redis.NewScript(`
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
`)

func toAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, v := range ss {
		out[i] = v
	}
	return out
}

// reload reads the shared entries (after a (re)subscription: announcements
// may have been missed): it scans the hash, stops after Max valid entries,
// stores them in one new map and removes from the hash the entries that
// are expired or do not decode.
func (s *Set) reload(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 4*s.cfg.Timeout)
	defer cancel()
	found := map[string]Refusal{}
	var drop []string
	var cursor uint64
	for {
		kv, next, err := s.cfg.Client.HScan(ctx, s.key, cursor, "", 256).Result()
		if err != nil {
			s.m.RedisErrors.WithLabelValues("badtags").Inc()
			break
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if r, ok := s.decode(kv[i], kv[i+1]); ok {
				if cur, seen := found[kv[i]]; !seen || cur.Until.Before(r.Until) {
					found[kv[i]] = r
				}
			} else if len(drop) < 2*s.cfg.Max {
				drop = append(drop, kv[i], kv[i+1])
			}
		}
		cursor = next
		if cursor == 0 || len(found) >= s.cfg.Max {
			break
		}
	}
	if len(drop) > 0 {
		if err := dropScript.Run(ctx, s.cfg.Client, []string{s.key}, toAny(drop)...).Err(); err != nil && !errors.Is(err, redis.Nil) {
			s.m.RedisErrors.WithLabelValues("badtags").Inc()
		}
	}
	s.addAll(found)
}
