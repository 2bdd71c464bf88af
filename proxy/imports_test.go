package proxy_test

import (
	"go/build"
	"slices"
	"testing"
)

// The proxy library is what every replica links: the emulator belongs to
// the demo (cmd/proxy) and to the tests, never to the library.
func TestLibraryDoesNotImportEmulator(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(pkg.Imports, "github.com/portrait-proxy/portrait-proxy/imsim") {
		t.Fatalf("package proxy imports imsim: %v", pkg.Imports)
	}
}
