package proxy_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/metrics"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// Forwarded bodies must not be buffered whole without bound: a caller with
// any user's UserSig (or anyone with -auth none) who sends all but the last
// byte of a 1 MiB body would hold ~1 MiB of proxy heap per connection for
// up to ReadTimeout (30s); over TLS/HTTP2, 250 streams per connection.
// Other calls' bodies stream through; only the account calls (at most
// 64 KiB) are read first.
func TestStalledForwardBodiesHeapBounded(t *testing.T) {
	// The upstream here reads bodies without keeping them (the emulator,
	// in this process too, keeps what it sees): the heap measured is the
	// proxy's.
	sim, _ := simtest.Start(t, imsim.Config{})
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write([]byte(`{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}`))
	}))
	t.Cleanup(sink.Close)
	r := startProxy(t, sim, sink.URL, proxy.Config{})
	q := callerQuery(r.sim, "user1", r.sim.Key())
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapInuse
	const n = 64
	chunk := strings.Repeat("x", 1<<20-1)
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", r.p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST /v4/openim/sendmsg?%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", q, 1<<20, chunk)
	}
	time.Sleep(2 * time.Second) // room for the proxy to buffer what it would: the heap is measured after
	runtime.GC()
	runtime.ReadMemStats(&ms)
	delta := int64(ms.HeapInuse) - int64(before)
	t.Logf("heap in use grew by %d MiB for %d stalled forwarded calls", delta>>20, n)
	if delta > 16<<20 {
		t.Fatalf("%d stalled callers hold %d MiB of proxy heap (no cap on bodies buffered at once)", n, delta>>20)
	}
}

// A streamed body that turns out larger than -forward-max-body (no
// Content-Length, so it is only known mid-stream) is cut off and answered
// the IM way; an account call's body over 64 KiB is refused unsent.
func TestForwardBodyLimitWhenStreamed(t *testing.T) {
	r := start(t, imsim.Config{}, proxy.Config{ForwardMaxBody: 64 << 10})
	q := callerQuery(r.sim, r.sim.Identifier(), r.sim.Key())
	for _, c := range []struct {
		name, path string
		size       int
	}{
		{"sendmsg, chunked", "/v4/openim/sendmsg", 256 << 10},
		{"account_delete", "/v4/im_open_login_svc/account_delete", 65<<10 + 1},
	} {
		body := io.MultiReader(strings.NewReader(`{"DeleteItem":[],"x":"`), strings.NewReader(strings.Repeat("x", c.size)))
		req, _ := http.NewRequest(http.MethodPost, "http://"+r.p.Addr()+c.path+"?"+q, body) // no length: chunked
		resp, err := noRedirects.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if e := envelopeOf(t, raw); resp.StatusCode != 200 || e.ErrorCode != im.CodeBadRequest || e.ActionStatus != "FAIL" {
			t.Errorf("%s: %d %s, want HTTP 200 and %d", c.name, resp.StatusCode, raw, im.CodeBadRequest)
		}
	}
	for _, s := range r.sim.Seen() {
		if len(s.Body) > 64<<10 || s.Path != "/v4/openim/sendmsg" {
			t.Errorf("upstream saw %s with %d body bytes: more than the limit, or an account call refused unsent", s.Path, len(s.Body))
		}
	}
}

// A caller that leaves mid-answer is still counted (the reverse proxy
// aborts the handler with a panic there).
func TestForwardCountedWhenCallerLeavesMidAnswer(t *testing.T) {
	sim, _ := simtest.Start(t, imsim.Config{})
	sent := make(chan struct{}, 1)
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"ActionStatus":"OK",`))
		w.(http.Flusher).Flush()
		sent <- struct{}{}
		<-r.Context().Done() // the rest never comes
	}))
	t.Cleanup(slow.Close)
	r := startProxy(t, sim, slow.URL, proxy.Config{})
	c, err := net.Dial("tcp", r.p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "POST /v4/openim/sendmsg?%s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", callerQuery(r.sim, "user1", r.sim.Key()))
	<-sent
	c.Close()
	wait.For(t, 10*time.Second, "the call whose caller left mid-answer to be counted as canceled", func() bool {
		return forwarded(r, "openim", metrics.ForwardCanceled) == 1
	})
}
