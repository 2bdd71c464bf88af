package proxy_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// BenchmarkHitPath measures one single-account lookup answered from the
// in-process tier, handler included, without the network.
func BenchmarkHitPath(b *testing.B) {
	sim, srv := simtest.Start(b, imsim.Config{})
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(),
		SecretKey: sim.Key(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	h := p.Handler()
	q := im.PathGet + "?sdkappid=1400000000&identifier=administrator&random=1&contenttype=json&usersig=" +
		signFor(sim)
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`
	stop := runProxy(b, p)
	defer stop()
	// Warm the account.
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, q, strings.NewReader(body)))
	if !strings.Contains(rec.Body.String(), "nick-user1") {
		b.Fatalf("warm-up: %s", rec.Body.String())
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, q, strings.NewReader(body)))
			if rec.Code != 200 {
				b.Fatal(rec.Code)
			}
		}
	})
}

// BenchmarkHitPathHandler is BenchmarkHitPath without the test harness's
// own allocations (a request and a recorder per lookup): each goroutine
// reuses one request, rewinding its body, and a writer that keeps one
// header map, so allocs/op is the handler's and the cache's own.
func BenchmarkHitPathHandler(b *testing.B) {
	sim, srv := simtest.Start(b, imsim.Config{})
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(),
		SecretKey: sim.Key(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	h := p.Handler()
	q := im.PathGet + "?sdkappid=1400000000&identifier=administrator&random=1&contenttype=json&usersig=" +
		url.QueryEscape(signFor(sim))
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`
	stop := runProxy(b, p)
	defer stop()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, q, strings.NewReader(body)))
	want := rec.Body.String()
	if !strings.Contains(want, "nick-user1") {
		b.Fatalf("warm-up: %s", want)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rd := strings.NewReader(body)
		req := httptest.NewRequest(http.MethodPost, q, rd)
		w := &reuseWriter{h: http.Header{}}
		for pb.Next() {
			rd.Reset(body)
			clear(w.h)
			w.body = w.body[:0]
			h.ServeHTTP(w, req)
			if w.code != 200 || string(w.body) != want {
				b.Fatalf("answer %d %s, want %s", w.code, w.body, want)
			}
		}
	})
}

// reuseWriter is a ResponseWriter whose header map and body buffer are
// reused from one request to the next.
type reuseWriter struct {
	h    http.Header
	code int
	body []byte
}

func (w *reuseWriter) Header() http.Header  { return w.h }
func (w *reuseWriter) WriteHeader(code int) { w.code = code }
func (w *reuseWriter) Write(p []byte) (int, error) {
	w.body = append(w.body, p...)
	return len(p), nil
}

func signFor(sim *imsim.Server) string {
	return usersig.Sign(sim.Key(), sim.SDKAppID(), sim.Identifier(), time.Now(), time.Hour)
}

func runProxy(b *testing.B, p *proxy.Proxy) func() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return func() { cancel(); <-done }
}

// BenchmarkForward measures one forwarded call through the handler (the
// caller side in-process) to an emulator over loopback HTTP: the proxy's
// own work per forwarded call plus one upstream round trip.
func BenchmarkForward(b *testing.B) {
	sim, srv := simtest.Start(b, imsim.Config{Behaviour: imsim.Behaviour{APIQuota: -1}})
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(),
		SecretKey: sim.Key(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	h := p.Handler()
	q := "/v4/openim/sendmsg?sdkappid=1400000000&identifier=administrator&random=1&contenttype=json&usersig=" + signFor(sim)
	body := `{"SyncOtherMachine":2,"From_Account":"user1","To_Account":"user2","MsgRandom":1287657,"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hello"}}]}`
	stop := runProxy(b, p)
	defer stop()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, q, strings.NewReader(body)))
			if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"ErrorCode":0`) {
				b.Fatal(rec.Code, rec.Body.String())
			}
		}
	})
}
