package proxy_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/proxy"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// TestNoSecretsInLogsOrErrors runs lookups through every failure the proxy
// logs or reports (bad caller sigs, upstream 502s, timeouts, throttling,
// Redis dying) and checks that neither the secret key nor any UserSig
// appears in the logs or in any answer.
func TestNoSecretsInLogsOrErrors(t *testing.T) {
	rs := singleRedis(t)
	sim, srv := simtest.Start(t, imsim.Config{Key: "s3cr3t-app-key-0123456789abcdef", Faults: imsim.Faults{Fail502: 0.3, Timeout: 0.1, TimeoutAfter: time.Second},
		Behaviour: imsim.Behaviour{Quota: 5}})
	logs := &syncBuffer{}
	p, err := proxy.New(proxy.Config{Listen: "127.0.0.1:0", AdminListen: "-", Upstream: srv.URL, SDKAppID: sim.SDKAppID(),
		SecretKey: sim.Key(), Redis: rs.spec, Rate: 50, UpstreamTimeout: 300 * time.Millisecond, RequestTimeout: 2 * time.Second,
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	good := usersig.Sign(sim.Key(), sim.SDKAppID(), sim.Identifier(), time.Now(), time.Hour)
	sigs := []string{good,
		usersig.Sign(sim.Key(), sim.SDKAppID(), sim.Identifier(), time.Now().Add(-3*time.Hour), time.Hour), // expired
		usersig.Sign("wrong-key", sim.SDKAppID(), sim.Identifier(), time.Now(), time.Hour),
		usersig.Sign(sim.Key(), sim.SDKAppID(), "someone", time.Now(), time.Hour),
		"eJxgarbage"}
	var answers syncBuffer
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Go(func() {
			sig := sigs[i%len(sigs)]
			url := "http://" + p.Addr() + im.PathGet + "?sdkappid=1400000000&identifier=administrator&random=1&contenttype=json&usersig=" + sig
			body := `{"To_Account":["` + imsim.AccountName(5000+i) + `"],"TagList":["Tag_Profile_IM_Nick"]}`
			resp, err := http.Post(url, "application/json", strings.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			answers.Write(raw)
			answers.Write([]byte("\n"))
		})
		if i == 30 {
			rs.kill()
		}
	}
	wg.Wait()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()

	text := logs.String() + answers.String()
	if !strings.Contains(logs.String(), "upstream call failed") {
		t.Fatalf("the failures were not logged; the test proves nothing:\n%s", logs.String())
	}
	if strings.Contains(text, sim.Key()) {
		t.Fatal("the secret key appears in logs or answers")
	}
	for _, s := range sigs {
		if strings.Contains(text, s) {
			t.Fatalf("a UserSig appears in logs or answers: %.20s…", s)
		}
	}
	if m := regexp.MustCompile(`usersig=[^R&"\s]`).FindString(text); m != "" {
		t.Fatalf("an unredacted usersig parameter in logs or answers: %s", m)
	}
	if strings.Contains(text, "eJw") || strings.Contains(text, "eJx") {
		t.Fatal("something that looks like a UserSig (zlib+base64) appears in logs or answers")
	}
}
