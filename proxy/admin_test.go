package proxy_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

func adminGet(t *testing.T, r *rig, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + r.p.AdminAddr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(raw)
}

// Profiling is off unless asked for, and even then the command line (which
// may hold -secret-key or a Redis password) is never served.
func TestAdminPprofOffByDefaultNeverCmdline(t *testing.T) {
	off := start(t, imsim.Config{}, proxy.Config{})
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/cmdline", "/debug/pprof/heap", "/debug/pprof/symbol"} {
		if code, _ := adminGet(t, off, path); code != http.StatusNotFound {
			t.Errorf("without -pprof: %s answered %d", path, code)
		}
	}
	if code, _ := adminGet(t, off, "/metrics"); code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	on := start(t, imsim.Config{}, proxy.Config{Pprof: true})
	if code, _ := adminGet(t, on, "/debug/pprof/"); code != 200 {
		t.Errorf("with -pprof: /debug/pprof/ answered %d", code)
	}
	if code, _ := adminGet(t, on, "/debug/pprof/heap"); code != 200 {
		t.Errorf("with -pprof: heap profile answered %d", code)
	}
	code, body := adminGet(t, on, "/debug/pprof/cmdline")
	if code == 200 || strings.Contains(body, on.sim.Key()) || strings.Contains(body, "-test.") {
		t.Fatalf("/debug/pprof/cmdline answered %d: %q", code, body)
	}
}
