// Package simtest runs the IM emulator for tests: over real loopback HTTP,
// stopped when the test ends, with a signer for its administrator.
package simtest

import (
	"net/http/httptest"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// Start serves an emulator with cfg on a loopback port until the test
// ends; the emulator's base URL is the returned server's URL.
func Start(t testing.TB, cfg imsim.Config) (*imsim.Server, *httptest.Server) {
	t.Helper()
	sim := imsim.New(cfg)
	srv := httptest.NewServer(sim)
	t.Cleanup(srv.Close)
	return sim, srv
}

// Signer signs UserSigs for sim's administrator with key (sim.Key() for
// the right one), each valid an hour.
func Signer(sim *imsim.Server, key string) *usersig.Signer {
	return usersig.NewSigner(key, sim.SDKAppID(), sim.Identifier(), time.Hour, nil)
}
