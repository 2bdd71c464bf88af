package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/internal/wait"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestParseFlagsAndEnv(t *testing.T) {
	cfg, err := parse([]string{"-rate", "50", "-sdkappid", "7"}, env(map[string]string{
		"PROXY_RATE":         "80", // the flag wins
		"PROXY_BATCH_MAX":    "40",
		"PROXY_TTL":          "2m",
		"TIM_SECRET_KEY":     "k1",
		"PROXY_LOG_LEVEL":    "debug",
		"PROXY_DEFAULT_TAGS": "Tag_Profile_IM_Nick,Tag_Profile_IM_Level",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Rate != 50 || cfg.SDKAppID != 7 || cfg.BatchMax != 40 || cfg.TTL != 2*time.Minute || cfg.SecretKey != "k1" || cfg.logLevel != "debug" || cfg.logFormat != "json" {
		t.Fatalf("cfg %+v level %s format %s", cfg, cfg.logLevel, cfg.logFormat)
	}
	if len(cfg.DefaultTags) != 2 {
		t.Fatalf("default tags %v", cfg.DefaultTags)
	}
	cfg, _ = parse(nil, env(map[string]string{"PROXY_SECRET_KEY": "k2", "TIM_SECRET_KEY": "k1"}), io.Discard)
	if cfg.SecretKey != "k2" {
		t.Fatalf("PROXY_SECRET_KEY should win over TIM_SECRET_KEY, got %q", cfg.SecretKey)
	}
	for _, bad := range [][]string{{"-rate", "x"}, {"stray"}, {"-nope"}} {
		if _, err := parse(bad, env(nil), io.Discard); err == nil {
			t.Errorf("parse(%v) accepted", bad)
		}
	}
	if _, err := parse(nil, env(map[string]string{"PROXY_RATE": "fast"}), io.Discard); err == nil || !strings.Contains(err.Error(), "PROXY_RATE") {
		t.Errorf("bad env value: %v", err)
	}
}

func TestRunRefusesIncompleteConfig(t *testing.T) {
	for _, args := range [][]string{
		{"-listen", "127.0.0.1:0", "-admin-listen", "-"},                           // no sdkappid
		{"-listen", "127.0.0.1:0", "-admin-listen", "-", "-sdkappid", "1"},         // no key
		{"-listen", "127.0.0.1:0", "-admin-listen", "-", "-demo", "-auth", "open"}, // bad auth mode
		{"-demo", "-log-level", "loud"},
	} {
		if err := run(context.Background(), args, env(nil), io.Discard); err == nil {
			t.Errorf("run(%v) started", args)
		}
	}
}

// startDemo runs start (run or runUntilSignal with the demo flags plus
// args) in the background and returns the URL and body of the curl line it
// prints, and the channel its error arrives on.
func startDemo(t *testing.T, start func(stdout io.Writer) error) (url, body string, done <-chan error) {
	t.Helper()
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() {
		errc <- start(pw)
		pw.Close()
	}()
	sc := bufio.NewScanner(pr)
	var curl string
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); strings.HasPrefix(line, "curl ") {
			curl = line
			break
		}
	}
	go io.Copy(io.Discard, pr)
	if curl == "" {
		t.Fatal("no curl line printed")
	}
	url = curl[strings.Index(curl, "'http")+1:]
	url = url[:strings.Index(url, "'")]
	body = curl[strings.Index(curl, "-d '")+4 : len(curl)-1]
	return url, body, errc
}

// TestRunDemo is `make run`: it starts, prints a curl line, answers it, and
// stops cleanly when its context ends.
func TestRunDemo(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	u, body, done := startDemo(t, func(stdout io.Writer) error {
		return run(ctx, []string{"-demo", "-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0", "-log-level", "error"}, env(nil), stdout)
	})
	resp, err := http.Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(raw), `"Value":"nick-user1"`) || !strings.Contains(string(raw), `"ActionStatus":"OK"`) {
		t.Fatalf("answer %s", raw)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

// TestSIGTERMLosesNoLookup sends the process SIGTERM while lookups wait on
// a slow upstream: every one is answered right, then the proxy exits cleanly.
func TestSIGTERMLosesNoLookup(t *testing.T) {
	u, _, done := startDemo(t, func(stdout io.Writer) error {
		return runUntilSignal([]string{"-demo", "-demo-latency", "300ms", "-listen", "127.0.0.1:0", "-admin-listen", "-", "-log-level", "error"}, env(nil), stdout)
	})
	type answer struct {
		body string
		err  error
	}
	answers := make(chan answer, 20)
	// A lookup sent with "Expect: 100-continue" is answered 100 Continue
	// when the proxy's handler starts reading its body: from then on it is
	// the proxy's to answer.
	var reading atomic.Int32
	traced := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{Got100Continue: func() { reading.Add(1) }})
	for i := range 20 {
		go func() {
			body := `{"To_Account":["user` + strconv.Itoa(100+i) + `"],"TagList":["Tag_Profile_IM_Nick"]}`
			req, err := http.NewRequestWithContext(traced, http.MethodPost, u, strings.NewReader(body))
			if err != nil {
				answers <- answer{err: err}
				return
			}
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Expect", "100-continue")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				answers <- answer{err: err}
				return
			}
			raw, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			answers <- answer{string(raw), err}
		}()
	}
	wait.For(t, 10*time.Second, "the proxy reading the 20 lookups", func() bool { return reading.Load() == 20 }) // the upstream takes 300ms
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		a := <-answers
		if a.err != nil || !strings.Contains(a.body, `"ActionStatus":"OK"`) || !strings.Contains(a.body, `"Value":"nick-user`) {
			t.Fatalf("lookup lost to SIGTERM: %v %s", a.err, a.body)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the proxy did not exit after SIGTERM")
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
}

func TestParseForwardAndTLSFlags(t *testing.T) {
	cfg, err := parse(nil, env(nil), io.Discard)
	if err != nil || cfg.DisableForward || cfg.ForwardMaxBody != 1<<20 || cfg.TLSCert != "" {
		t.Fatalf("defaults: %+v %v", cfg, err)
	}
	cfg, err = parse([]string{"-tls-key", "/k.pem"}, env(map[string]string{
		"PROXY_FORWARD": "false", "PROXY_TLS_CERT": "/c.pem", "PROXY_TLS_KEY": "/other.pem", "PROXY_FORWARD_MAX_BODY": "4096"}), io.Discard)
	if err != nil || !cfg.DisableForward || cfg.TLSCert != "/c.pem" || cfg.TLSKey != "/k.pem" || cfg.ForwardMaxBody != 4096 {
		t.Fatalf("env: %+v %v", cfg, err)
	}
	if _, err := parse(nil, env(map[string]string{"PROXY_FORWARD": "maybe"}), io.Discard); err == nil {
		t.Fatal("PROXY_FORWARD=maybe accepted")
	}
}

// Every hardening flag has its env twin, and the defaults are the closed
// ones.
func TestSecurityFlagsAndEnv(t *testing.T) {
	cfg, err := parse(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Pprof || cfg.CallbackUnsigned || cfg.AuthNoneWrites || cfg.CallbackUnsignedRate != 100 || cfg.RedisPassword != "" || cfg.RedisCA != "" {
		t.Fatalf("defaults %+v", cfg)
	}
	cfg, err = parse(nil, env(map[string]string{
		"PROXY_PPROF": "true", "PROXY_CALLBACK_UNSIGNED": "true", "PROXY_CALLBACK_UNSIGNED_RATE": "7",
		"PROXY_AUTH_NONE_WRITES": "true", "PROXY_REDIS_PASSWORD": "pw", "PROXY_REDIS_CA": "/ca.pem",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Pprof || !cfg.CallbackUnsigned || !cfg.AuthNoneWrites || cfg.CallbackUnsignedRate != 7 || cfg.RedisPassword != "pw" || cfg.RedisCA != "/ca.pem" {
		t.Fatalf("from env %+v", cfg)
	}
}

// TestCustomTagsOnlySeparatorsMeansLearn: -custom-tags made only of
// separators and blanks is no list (learn from the upstream), not an empty
// list that refuses every custom tag with 40009.
func TestCustomTagsOnlySeparatorsMeansLearn(t *testing.T) {
	for _, v := range []string{" , ", ",", " "} {
		cfg, err := parse([]string{"-custom-tags", v}, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.CustomTags != nil {
			t.Fatalf("-custom-tags %q: CustomTags %#v (non-nil, empty): every custom tag answered 40009", v, cfg.CustomTags)
		}
	}
	cfg, err := parse([]string{"-custom-tags", " Tag_Profile_Custom_A ,,"}, func(string) string { return "" }, io.Discard)
	if err != nil || len(cfg.CustomTags) != 1 || cfg.CustomTags[0] != "Tag_Profile_Custom_A" {
		t.Fatalf("%#v %v", cfg.CustomTags, err)
	}
}
