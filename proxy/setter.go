package proxy

import (
	"context"
	"errors"
	"time"

	"github.com/portrait-proxy/portrait-proxy/httpapi"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/limiter"
	"github.com/portrait-proxy/portrait-proxy/upstream"
)

// setter makes portrait_set calls under their own quota (a limiter of its
// own, shared across replicas through Redis like the lookup quota). A
// throttled or unanswered call is tried again, up to three attempts while
// the caller's deadline allows: portrait_set writes values, so a repeat
// is harmless. When an attempt got no answer and a later one was refused,
// the error also matches httpapi.ErrMaybeApplied: the first may have been
// applied.
type setter struct {
	lim     setLimiter
	client  *upstream.Client
	backoff time.Duration // after a throttling answer; default 1s
}

// setLimiter is portrait_set's quota, as the setter uses it; limiter.Local
// and limiter.Shared implement it.
type setLimiter interface {
	// Acquire blocks until a call may start (see limiter.Limiter).
	Acquire(ctx context.Context) (*limiter.Permit, error)
	// Throttled is told when the upstream said "too frequent": the limiter
	// pauses grants for pause and lowers its rate for a while.
	Throttled(pause time.Duration)
}

func (s *setter) PortraitSet(ctx context.Context, req im.SetRequest) (err error) {
	unsure := false // some attempt may have been applied
	defer func() {
		if unsure && err != nil && !errors.Is(err, httpapi.ErrMaybeApplied) {
			err = errors.Join(httpapi.ErrMaybeApplied, err)
		}
	}()
	for attempt := range 3 {
		if attempt > 0 {
			wait := 50 * time.Millisecond << attempt
			if dl, ok := ctx.Deadline(); ok && time.Until(dl) < wait+100*time.Millisecond {
				return err
			}
			select {
			case <-ctx.Done():
				return err
			case <-time.After(wait):
			}
		}
		permit, aerr := s.lim.Acquire(ctx)
		if aerr != nil {
			if err == nil {
				err = aerr
			}
			return err
		}
		err = s.client.PortraitSet(ctx, req)
		permit.Done()
		switch upstream.KindOf(err) {
		case im.KindOK:
			return nil
		case im.KindThrottled:
			s.lim.Throttled(upstream.ThrottlePause(err, s.backoff))
		case im.KindTransport, im.KindHTTP, im.KindTransient:
			unsure = true
		default:
			return err
		}
	}
	return err
}
