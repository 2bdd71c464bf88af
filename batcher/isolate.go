package batcher

import (
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// Isolation. A call carries the union of its callers' tags for up to 100
// accounts, so something one caller asked for can make the upstream refuse
// the whole call: a tag that does not exist (40009) or may not be read
// (40007), a tag name it rejects (40801), an account id it cannot read
// (60015, 40001) or that does not exist (40003). Such a refusal is never
// passed to the other callers of the call. The batch is sent again split:
//
//   - by the callers' tag sets first, for a refusal a tag causes: the
//     callers whose tags are all standard go in one part, those asking for
//     custom tags in the other (standard tags always exist); past that the
//     tag sets are halved. A part with a single tag set that still fails
//     is sent once more without DefaultTags (one of them may be the cause);
//   - by halves of the accounts, for a refusal an account causes.
//
// A refusal that still comes back for a single tag set (or a single
// account) belongs to the callers who asked for it: they get the upstream's
// code, with their own tags (or account) named in ErrorInfo. Every part
// is an ordinary call under the limiter. One offending tag set among g
// costs at most 2·⌈log₂ g⌉ + 2 calls after the refused one (one, without
// DefaultTags, when g is 1), one offending account among n at most
// 2·⌈log₂ n⌉: logarithmic in the batch, never a call per caller. Each is
// counted in isolation_calls_total. A refused batch has a budget of that
// many calls, shared by all its parts (isolationBudget): many offenders in
// one batch cannot make it cost more; when it is spent, the parts still
// refused get the upstream's refusal as it came and are counted in
// isolation_unresolved_total. A 40001 ("could not unpack": an account or
// the tags) for a single tag set sends one account alone first, and if it
// is refused, a second one: both refused, the tags are the cause and every
// caller gets it at once; one answered, the other accounts are asked and
// halved as usual (and a first probe refused alone gets its refusal).

// formed is a batch formed before its turn: a retry, or a part of an
// isolation split.
type formed struct {
	entries []*entry
	bare    bool   // carries only its callers' tags, not DefaultTags
	cause   string // non-empty: sent to isolate a refusal (isolation_calls_total{cause})
	// blamed is a refusal that the same batch with DefaultTags got: if the
	// bare call is answered, a default tag caused it.
	blamed *upstream.Error
	// budget is what is left of the isolation calls allowed for the
	// refused batch this part comes from (shared by all its parts); nil
	// before a refusal.
	budget *atomic.Int64
	// rest, for a probe (one account of a batch refused with 40001 sent
	// alone), is the batch's other accounts: asked after the probe is
	// answered (an account caused the refusal), refused with it when the
	// probe is refused too (its tags did).
	rest []*entry
	// suspect, for a second probe, is the first probe, refused alone with
	// suspectErr: answered, the second probe clears the tags and the
	// suspect's account is the cause; refused too, the tags are.
	suspect    []*entry
	suspectErr *upstream.Error
}

// isolationBudget is how many isolation calls a refused batch of n
// accounts and g tag sets may cost: 2·⌈log₂ max(n, g)⌉, and 2 more when a
// tag may be the cause (the sends without DefaultTags).
func isolationBudget(n, g int, byTags bool) int64 {
	k := int64(bits.Len(uint(max(n, g, 1) - 1)))
	if byTags {
		return 2*k + 2
	}
	return 2 * k
}

// spend takes k calls from form's budget (made for batch on the first
// refusal); false when they are not left.
func (b *Batcher) spend(batch []*entry, form *formed, k int, byTags bool) bool {
	if form.budget == nil {
		form.budget = new(atomic.Int64)
		form.budget.Store(isolationBudget(len(batch), len(groupByTags(batch)), byTags))
	}
	if form.budget.Add(int64(-k)) < 0 {
		form.budget.Add(int64(k))
		return false
	}
	return true
}

// TagLearner is told of tags the upstream refused, once isolation has
// pinned a refusal on one tag, and says which tags are known to be refused
// (they are left out of DefaultTags).
type TagLearner interface {
	Learn(tag string, code int, info string)
	Refused(tag string) bool
}

// isolable reports whether a whole-call refusal with code may be caused by
// one caller's request rather than by the app or the proxy.
func isolable(code int) bool {
	byTags, byAccounts := blames(code)
	return byTags || byAccounts
}

// blames says what in a call a whole-call refusal with code can be caused
// by: its tags, its accounts, or (40001, "could not unpack") either.
func blames(code int) (byTags, byAccounts bool) {
	switch code {
	case im.CodeTagNotExist, im.CodeTagNoPermission, im.CodeInvalidTag, 40804, 40806:
		return true, false
	case im.CodeAccountType, im.CodeAccountNotFound, im.CodeNotImported:
		return false, true
	case im.CodeBadRequest:
		return true, true
	}
	return false, false
}

func (b *Batcher) refused(tag string) bool {
	return b.cfg.Tags != nil && b.cfg.Tags.Refused(tag)
}

// isolate queues batch again in two parts to find what caused a refusal:
// by tag sets (byTags), else by accounts (byAccounts). It returns false
// when the batch cannot be split further: the cause stands alone.
// Every part is taken from the refused batch's isolation budget; when it
// is spent, isolate gives up: it refuses batch with ue (the upstream's
// refusal as it came), counts the accounts in isolation_unresolved_total
// and returns true.
func (b *Batcher) isolate(batch []*entry, form formed, ue *upstream.Error, byTags, byAccounts bool) bool {
	giveUp := func() bool {
		b.m.IsolationGaveUp.Add(float64(len(batch)))
		if ue == nil {
			return false // nothing refused yet: the caller refuses
		}
		b.refuse(batch, ue, false, false)
		return true
	}
	var groups []*tagGroup
	if byTags && !form.bare && ue != nil {
		if tag := b.namedDefault(batch, ue); tag != "" {
			// The upstream named a default tag: learn it now and send the
			// callers' own tags once more, whatever their tag sets.
			if !b.spend(batch, &form, 1, byTags) {
				return giveUp()
			}
			if b.cfg.Tags != nil {
				b.cfg.Tags.Learn(tag, ue.Code, ue.Info)
			}
			b.m.UpstreamRetries.WithLabelValues("split").Add(float64(len(batch)))
			b.requeueReady(formed{entries: batch, bare: true, cause: metrics.IsolateTag, budget: form.budget})
			return true
		}
	}
	if byTags {
		if groups = groupByTags(batch); len(groups) > 1 {
			if !b.spend(batch, &form, 2, byTags) {
				return giveUp()
			}
			left, right := halveGroups(groups)
			b.m.UpstreamRetries.WithLabelValues("split").Add(float64(len(batch)))
			b.requeueReady(formed{entries: left, bare: true, cause: metrics.IsolateTag, budget: form.budget},
				formed{entries: right, bare: true, cause: metrics.IsolateTag, budget: form.budget})
			return true
		}
		if !form.bare && len(b.cfg.DefaultTags) > 0 {
			if !b.spend(batch, &form, 1, byTags) {
				return giveUp()
			}
			b.m.UpstreamRetries.WithLabelValues("split").Add(float64(len(batch)))
			b.requeueReady(formed{entries: batch, bare: true, cause: metrics.IsolateTag, blamed: ue, budget: form.budget})
			return true
		}
	}
	if byAccounts && len(batch) > 1 {
		if byTags && ue != nil && form.budget == nil {
			// 40001 with one tag set: an account or the tags. One account
			// alone first; if it is refused too, the tags are the cause.
			if !b.spend(batch, &form, 1, byTags) {
				return giveUp()
			}
			b.m.UpstreamRetries.WithLabelValues("split").Add(1)
			b.requeueReady(formed{entries: batch[:1:1], bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget, rest: batch[1:]})
			return true
		}
		if !b.spend(batch, &form, 2, byTags) {
			return giveUp()
		}
		b.m.UpstreamRetries.WithLabelValues("split").Add(float64(len(batch)))
		half := len(batch) / 2
		b.requeueReady(formed{entries: batch[:half:half], bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget},
			formed{entries: batch[half:], bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget})
		return true
	}
	return false
}

// probed settles a probe's rest (see formed.rest) once the probe had an
// answer other than its refusal: the rest is asked, with the account now
// blamed.
func (b *Batcher) probed(form formed) {
	if len(form.suspect) > 0 {
		b.refuse(form.suspect, form.suspectErr, false, true)
	}
	if len(form.rest) > 0 {
		b.requeueReady(formed{entries: form.rest, bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget})
	}
}

// orphaned asks a probe's suspect and rest again, halved as usual, when
// the probe's own callers left before it was answered.
func (b *Batcher) orphaned(form formed) formed {
	return formed{entries: slices.Concat(form.suspect, form.rest), bare: form.bare, cause: metrics.IsolateAccount, budget: form.budget}
}

// tagGroup is the callers of a batch who asked for one tag set.
type tagGroup struct {
	tags    []string
	custom  bool // some tag is custom
	waiters map[*entry][]*waiter
	order   []*entry
}

// groupByTags groups batch's callers by the tag set each asked for, in
// order of first appearance.
func groupByTags(batch []*entry) []*tagGroup {
	var groups []*tagGroup
	byKey := map[string]*tagGroup{}
	for _, e := range batch {
		for _, w := range e.waiters {
			k := tagKey(w.tags)
			g := byKey[k]
			if g == nil {
				g = &tagGroup{tags: w.tags, custom: im.ClassesOf(w.tags)&im.ClassCustom != 0, waiters: map[*entry][]*waiter{}}
				byKey[k] = g
				groups = append(groups, g)
			}
			if g.waiters[e] == nil {
				g.order = append(g.order, e)
			}
			g.waiters[e] = append(g.waiters[e], w)
		}
	}
	return groups
}

func tagKey(tags []string) string {
	s := slices.Clone(tags)
	slices.Sort(s)
	return strings.Join(slices.Compact(s), "\x00")
}

// halveGroups splits groups in two parts, as entries (one per account and
// part, holding that part's callers): the groups asking only for standard
// tags against the others when both kinds are there, else halves.
func halveGroups(groups []*tagGroup) (left, right []*entry) {
	var std, custom []*tagGroup
	for _, g := range groups {
		if g.custom {
			custom = append(custom, g)
		} else {
			std = append(std, g)
		}
	}
	if len(std) == 0 || len(custom) == 0 {
		std, custom = groups[:len(groups)/2], groups[len(groups)/2:]
	}
	return entriesOf(std), entriesOf(custom)
}

// entriesOf builds one entry per account for the callers of groups.
func entriesOf(groups []*tagGroup) []*entry {
	var out []*entry
	byEntry := map[*entry]*entry{}
	for _, g := range groups {
		for _, e := range g.order {
			ne := byEntry[e]
			if ne == nil {
				ne = &entry{account: e.account, queued: e.queued, attempts: e.attempts, throttled: e.throttled, asked: e.asked}
				byEntry[e] = ne
				out = append(out, ne)
			}
			ne.addTags(g.tags)
			ne.waiters = append(ne.waiters, g.waiters[e]...)
		}
	}
	return out
}

// refuse answers every caller of batch with the refusal ue, naming in
// ErrorInfo the caller's own tags (byTags) or account (byAccounts, when the
// account stands alone), and tells the TagLearner of a refused tag it can
// pin down.
func (b *Batcher) refuse(batch []*entry, ue *upstream.Error, byTags, byAccounts bool) {
	learned := map[string]bool{}
	for _, e := range batch {
		for _, w := range e.waiters {
			info := ue.Info
			if byTags {
				tag := culprit(ue, w.tags)
				switch {
				case tag != "" && !strings.Contains(info, tag):
					info += " (tag " + tag + ")"
				case tag == "" && !mentionsAny(info, w.tags):
					info += " (TagList " + strings.Join(w.tags, ",") + ")"
				}
				if tag != "" && b.cfg.Tags != nil && !learned[tag] && ue.Code != im.CodeBadRequest {
					learned[tag] = true
					b.cfg.Tags.Learn(tag, ue.Code, info)
				}
			}
			if byAccounts && len(batch) == 1 && !strings.Contains(info, e.account) {
				info += " (To_Account " + strconv.Quote(e.account) + ")"
			}
			err := &upstream.Error{Kind: ue.Kind, Code: ue.Code, Info: info}
			if byAccounts && len(batch) == 1 && b.cfg.RejectTTL > 0 {
				b.rejected.put(e.account, w.tags, err, b.now(), b.cfg.RejectTTL)
			}
			w.done <- outcome{err: err}
		}
		e.waiters = nil
	}
}

// culprit returns the one tag of tags that the refusal ue is about, or ""
// when it cannot tell: the single tag the upstream's ErrorInfo names, else
// the single candidate (a tag that does not exist is never a standard one).
func culprit(ue *upstream.Error, tags []string) string {
	var named, candidates []string
	for _, t := range tags {
		if ue.Code == im.CodeTagNotExist && im.IsStandardTag(t) {
			continue
		}
		candidates = append(candidates, t)
		if containsWord(ue.Info, t) {
			named = append(named, t)
		}
	}
	switch {
	case len(named) == 1:
		return named[0]
	case len(named) == 0 && len(candidates) == 1:
		return candidates[0]
	}
	return ""
}

// containsWord reports whether s holds tag not followed by another letter
// (Tag_Profile_Custom_A is not named by "Tag_Profile_Custom_Ab").
func containsWord(s, tag string) bool {
	for i := strings.Index(s, tag); i >= 0; {
		end := i + len(tag)
		if end == len(s) || !isLetter(s[end]) {
			return true
		}
		j := strings.Index(s[end:], tag)
		if j < 0 {
			return false
		}
		i = end + j
	}
	return false
}

func isLetter(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }

func mentionsAny(s string, tags []string) bool {
	return slices.ContainsFunc(tags, func(t string) bool { return containsWord(s, t) })
}

// namedDefault returns the default tag that the refusal ue names, when it
// names exactly one tag of the call and that one is a default tag no
// caller asked for; else "". Not for 40001, which names no tag.
func (b *Batcher) namedDefault(batch []*entry, ue *upstream.Error) string {
	if ue.Code == im.CodeBadRequest || len(b.cfg.DefaultTags) == 0 {
		return ""
	}
	named := map[string]bool{}
	for _, t := range b.cfg.DefaultTags {
		if !b.refused(t) && containsWord(ue.Info, t) {
			named[t] = true
		}
	}
	if len(named) != 1 {
		return ""
	}
	for _, e := range batch {
		for _, w := range e.waiters {
			for _, t := range w.tags {
				if containsWord(ue.Info, t) {
					return "" // a caller's own tag is named (or it asked for the default tag)
				}
			}
		}
	}
	for t := range named {
		return t
	}
	return ""
}

// blameDefaults learns the default tag that caused the refusal ue, when
// the callers' own tags were answered without DefaultTags and a single
// default tag can have caused it.
func (b *Batcher) blameDefaults(ue *upstream.Error) {
	if b.cfg.Tags == nil || ue.Code == im.CodeBadRequest {
		return
	}
	if tag := culprit(ue, slices.DeleteFunc(slices.Clone(b.cfg.DefaultTags), b.refused)); tag != "" {
		b.cfg.Tags.Learn(tag, ue.Code, ue.Info)
	}
}

// unconcerned completes e's callers whom the "no data of class cls" answer
// o concerns (they asked for a tag of that class) and returns an entry for
// the others, to be asked again without that class — once: after that,
// every caller gets the answer.
func (b *Batcher) unconcerned(e *entry, cls im.TagClass, o outcome) *entry {
	var other []*waiter
	for _, w := range e.waiters {
		if e.asked > 0 || im.ClassesOf(w.tags)&cls != 0 {
			w.done <- o
		} else {
			other = append(other, w)
		}
	}
	e.waiters = nil
	if len(other) == 0 {
		return nil
	}
	ne := &entry{account: e.account, queued: e.queued, attempts: e.attempts, throttled: e.throttled, asked: e.asked + 1, waiters: other}
	for _, w := range other {
		ne.addTags(w.tags)
	}
	return ne
}

// rejections remembers, per account and tag set, the refusals isolation
// pinned on an account, until their time. The zero value is ready.
type rejections struct {
	n  atomic.Int64 // len(m), so the common case (none) takes no lock
	mu sync.Mutex
	m  map[string]rejection
}

type rejection struct {
	err   error
	until time.Time
}

// maxRejections bounds the remembered refusals; when full, expired ones
// are dropped, and if none is, all are.
const maxRejections = 10_000

func rejectionKey(account string, tags []string) string { return account + "\x01" + tagKey(tags) }

func (r *rejections) get(account string, tags []string, now time.Time) error {
	if r.n.Load() == 0 {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	k := rejectionKey(account, tags)
	x, ok := r.m[k]
	if !ok {
		return nil
	}
	if !now.Before(x.until) {
		delete(r.m, k)
		r.n.Store(int64(len(r.m)))
		return nil
	}
	return x.err
}

func (r *rejections) put(account string, tags []string, err error, now time.Time, ttl time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]rejection{}
	}
	if len(r.m) >= maxRejections {
		for k, x := range r.m {
			if !now.Before(x.until) {
				delete(r.m, k)
			}
		}
		if len(r.m) >= maxRejections {
			clear(r.m)
		}
	}
	r.m[rejectionKey(account, tags)] = rejection{err, now.Add(ttl)}
	r.n.Store(int64(len(r.m)))
}
