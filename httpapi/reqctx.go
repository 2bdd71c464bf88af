package httpapi

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// deadlineCtx is context.WithDeadline(parent, deadline), made the first
// time anything but Deadline is asked of it. A lookup answered from the
// cache never waits on its context, so the hit path pays neither the
// timer nor the registration with the parent that WithDeadline costs;
// a lookup that waits gets the real thing. Its deadline is fixed when it
// is created, as WithDeadline's.
type deadlineCtx struct {
	parent   context.Context
	deadline time.Time
	made     atomic.Bool // ctx and cancel are set
	mu       sync.Mutex
	ctx      context.Context
	cancel   context.CancelFunc
	ended    bool // end was called: a context made now is made cancelled
}

func (c *deadlineCtx) real() context.Context {
	if c.made.Load() {
		return c.ctx
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.made.Load() {
		if c.ended {
			// Made after its lookup ended (a context kept past it): born
			// cancelled, without asking the parent, which may be serving
			// the connection's next request by now.
			c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(c.parent))
			c.cancel()
			c.made.Store(true)
			return c.ctx
		}
		if p, ok := c.parent.(withDeadliner); ok {
			c.ctx, c.cancel = p.WithDeadline(c.deadline)
		} else {
			c.ctx, c.cancel = context.WithDeadline(c.parent, c.deadline)
		}
		c.made.Store(true)
	}
	return c.ctx
}

// withDeadliner is a parent that makes context.WithDeadline of itself in
// a cheaper way (the front's request context: one context instead of two).
type withDeadliner interface {
	WithDeadline(time.Time) (context.Context, context.CancelFunc)
}

// Deadline is WithDeadline's: the parent's when that is sooner.
func (c *deadlineCtx) Deadline() (time.Time, bool) {
	if d, ok := c.parent.Deadline(); ok && d.Before(c.deadline) {
		return d, true
	}
	return c.deadline, true
}

func (c *deadlineCtx) Done() <-chan struct{} { return c.real().Done() }
func (c *deadlineCtx) Err() error            { return c.real().Err() }
func (c *deadlineCtx) Value(key any) any     { return c.real().Value(key) }

// end is the CancelFunc: it releases what the context holds, if it was
// made, and cancels it either way (a context made later is made
// cancelled). The front's request context, which a context made over it
// is, ends with its request instead: its CancelFunc does nothing.
func (c *deadlineCtx) end() {
	c.mu.Lock()
	c.ended = true
	made := c.made.Load()
	c.mu.Unlock()
	if made {
		c.cancel()
	}
}
