package httpapi

import (
	"sync"
	"sync/atomic"
	"time"
)

// snapMap is a bounded string-keyed map for the hit path: a lookup of a
// settled key reads an immutable snapshot without a lock and without
// allocating. New keys wait in a small pending map (under mu) and are
// folded into a new snapshot once they are half as many as the snapshot
// holds, or snapRefresh after the last fold: the cost of an insertion is
// amortised O(1) whatever an attacker sends, and a key looked up often
// reaches the lock-free snapshot soon. When max keys are held, all are
// forgotten (they are cheap to learn again).
type snapMap[V any] struct {
	snap atomic.Pointer[map[string]V] // never changed once stored

	mu      sync.Mutex
	pending map[string]V
	folded  time.Time // when snap was last built
	max     int
}

const snapRefresh = 100 * time.Millisecond

// get returns the value of key.
func (m *snapMap[V]) get(key string) (V, bool) {
	if s := m.snap.Load(); s != nil {
		if v, ok := (*s)[key]; ok {
			return v, true
		}
	}
	return m.getPending(key)
}

// getBytes is get for a key held in bytes (the lookup copies nothing).
func (m *snapMap[V]) getBytes(key []byte) (V, bool) {
	if s := m.snap.Load(); s != nil {
		if v, ok := (*s)[string(key)]; ok {
			return v, true
		}
	}
	return m.getPending(string(key))
}

// getPending looks under mu: in pending, or in a snapshot folded since the
// caller read one.
func (m *snapMap[V]) getPending(key string) (V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s := m.snap.Load(); s != nil {
		if v, ok := (*s)[key]; ok {
			return v, true
		}
	}
	v, ok := m.pending[key]
	if ok && time.Since(m.folded) >= snapRefresh {
		m.fold()
	}
	return v, ok
}

// put sets key to v; key must not be changed afterwards.
func (m *snapMap[V]) put(key string, v V) {
	m.mu.Lock()
	defer m.mu.Unlock()
	held := len(m.pending)
	if s := m.snap.Load(); s != nil {
		held += len(*s)
	}
	if held >= m.max {
		m.snap.Store(nil)
		m.pending = nil
		held = 0
	}
	if m.pending == nil {
		m.pending = map[string]V{}
	}
	m.pending[key] = v
	if s := m.snap.Load(); s == nil || len(m.pending) > len(*s)/2 || time.Since(m.folded) >= snapRefresh {
		m.fold()
	}
}

// fold builds a new snapshot of snap and pending. m.mu is held.
func (m *snapMap[V]) fold() {
	old := m.snap.Load()
	n := len(m.pending)
	if old != nil {
		n += len(*old)
	}
	next := make(map[string]V, n)
	if old != nil {
		for k, v := range *old {
			next[k] = v
		}
	}
	for k, v := range m.pending {
		next[k] = v
	}
	m.snap.Store(&next)
	clear(m.pending)
	m.folded = time.Now()
}

// len is how many keys are held.
func (m *snapMap[V]) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := len(m.pending)
	if s := m.snap.Load(); s != nil {
		n += len(*s)
	}
	return n
}
