package proxy

import (
	"io"
	"log/slog"
	"net/http/httptest"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// The admin listener cannot be held open by a slow or idle client.
func TestAdminListenerTimeouts(t *testing.T) {
	sim := imsim.New(imsim.Config{})
	srv := httptest.NewServer(sim)
	defer srv.Close()
	p, err := New(Config{Upstream: srv.URL, SDKAppID: sim.SDKAppID(), AdminIdentifier: sim.Identifier(), SecretKey: sim.Key(),
		Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.closeListeners()
	s := p.admin
	if s.ReadHeaderTimeout <= 0 || s.ReadTimeout <= 0 || s.WriteTimeout <= 0 || s.IdleTimeout <= 0 || s.MaxHeaderBytes <= 0 {
		t.Fatalf("admin server timeouts: header %v read %v write %v idle %v, max header %d",
			s.ReadHeaderTimeout, s.ReadTimeout, s.WriteTimeout, s.IdleTimeout, s.MaxHeaderBytes)
	}
}
