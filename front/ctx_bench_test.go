package front

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// waiter is a handler that makes the context a lookup that may wait
// makes (its deadline), asks for Done as a wait would, and answers at
// once: the context's own cost per request.
type waiter struct{ derive bool }

func (w waiter) ServeFast(ctx context.Context, rawQuery string, body []byte, out []byte) []byte {
	d := time.Now().Add(time.Second)
	var wctx context.Context
	var cancel context.CancelFunc
	if p, ok := ctx.(interface {
		WithDeadline(time.Time) (context.Context, context.CancelFunc)
	}); ok && !w.derive {
		wctx, cancel = p.WithDeadline(d)
	} else {
		wctx, cancel = context.WithDeadline(ctx, d)
	}
	select {
	case <-wctx.Done():
	default:
	}
	cancel()
	return append(out, "x"...)
}

// BenchmarkWaitingLookupContext: parallel keep-alive clients, each
// request's handler making the context of a lookup that may wait, as the
// HTTP handler does (one context: the request's, with the deadline), or
// as context.WithDeadline of the request's context (derived).
func BenchmarkWaitingLookupContext(b *testing.B) {
	for _, derive := range []bool{false, true} {
		name := "one context"
		if derive {
			name = "derived"
		}
		b.Run(name, func(b *testing.B) {
			addr := benchServe(b, waiter{derive})
			req := []byte(lookup("a=1", `{"To_Account":["user1"]}`))
			b.ReportAllocs()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Error(err)
					return
				}
				defer c.Close()
				br := bufio.NewReader(c)
				for pb.Next() {
					if _, err := c.Write(req); err != nil {
						b.Error(err)
						return
					}
					resp, err := http.ReadResponse(br, nil)
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		})
	}
}
