package proxy_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/internal/simtest"
	"github.com/portrait-proxy/portrait-proxy/internal/wait"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// selfSigned returns a PEM certificate and key for 127.0.0.1 with serial.
func selfSigned(t *testing.T, serial int64) (certPEM, keyPEM []byte, cert *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "portrait-proxy test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Duration(serial) * 24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ = x509.ParseCertificate(der)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), cert
}

// writeAtomic replaces path's content the way a Secret volume does: a new
// file renamed over the old one.
func writeAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// The API over TLS: HTTP/2 and HTTP/1.1, session resumption for clients
// that close every connection, and a rotated certificate picked up for
// new connections without a restart while open connections go on.
func TestTLSServedAndRotated(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	c1, k1, x1 := selfSigned(t, 1)
	c2, k2, x2 := selfSigned(t, 2)
	writeAtomic(t, certFile, c1)
	writeAtomic(t, keyFile, k1)
	sim, srv := simtest.Start(t, imsim.Config{})
	r := startProxy(t, sim, srv.URL, proxy.Config{TLSCert: certFile, TLSKey: keyFile, TLSReloadEvery: 5 * time.Millisecond})
	roots := x509.NewCertPool()
	roots.AddCert(x1)
	roots.AddCert(x2)
	base := "https://" + r.p.Addr()
	_, query, _ := strings.Cut(r.url, "?")
	lookup := base + im.PathGet + "?" + query
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`

	h2 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}
	t.Cleanup(h2.CloseIdleConnections)
	t.Cleanup(h1.CloseIdleConnections)
	post := func(tr http.RoundTripper, reused *bool) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, lookup, strings.NewReader(body))
		if reused != nil {
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { *reused = i.Reused }}))
		}
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var out im.GetResponse
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		checkItem(t, out.UserProfileItem[0], "user1", nickTag)
		return resp
	}
	serial := func(resp *http.Response) int64 { return resp.TLS.PeerCertificates[0].SerialNumber.Int64() }
	if resp := post(h2, nil); resp.ProtoMajor != 2 || serial(resp) != 1 {
		t.Fatalf("HTTP/%d, certificate %d", resp.ProtoMajor, serial(resp))
	}
	if resp := post(h1, nil); resp.ProtoMajor != 1 || serial(resp) != 1 {
		t.Fatalf("HTTP/%d, certificate %d", resp.ProtoMajor, serial(resp))
	}

	// A client that closes its connection after every call resumes its
	// TLS session instead of a full handshake.
	resuming := &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: roots, ClientSessionCache: tls.NewLRUClientSessionCache(4)}}
	post(resuming, nil)
	if resp := post(resuming, nil); !resp.TLS.DidResume {
		t.Fatal("second connection did not resume its TLS session")
	}

	// A half-written pair does not load; the current certificate stays.
	writeAtomic(t, keyFile, []byte("-----BEGIN EC PRIVATE KEY-----\nnot a key\n-----END EC PRIVATE KEY-----\n"))
	reloads := r.p.Metrics().TLSReloads
	wait.For(t, 5*time.Second, "the broken key file to be noticed (a reload error counted)", func() bool {
		return testutil.ToFloat64(reloads.WithLabelValues("error")) != 0
	})
	fresh := &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: roots}}
	if resp := post(fresh, nil); serial(resp) != 1 {
		t.Fatalf("serving certificate %d after a broken rotation", serial(resp))
	}

	// The rotation proper: both files replaced.
	writeAtomic(t, certFile, c2)
	writeAtomic(t, keyFile, k2)
	wait.For(t, 5*time.Second, "the rotated certificate to be served", func() bool { return serial(post(fresh, nil)) == 2 })
	// Connections opened before go on, with the certificate they have.
	for name, tr := range map[string]*http.Transport{"h1": h1, "h2": h2} {
		var reused bool
		if resp := post(tr, &reused); !reused || serial(resp) != 1 {
			t.Fatalf("%s: reused %v, certificate %d: an open connection was dropped by the rotation", name, reused, serial(resp))
		}
	}
	if n := testutil.ToFloat64(reloads.WithLabelValues("ok")); n != 1 {
		t.Fatalf("%v reloads counted, want 1", n)
	}
	if got := testutil.ToFloat64(r.p.Metrics().TLSNotAfter); int64(got) != x2.NotAfter.Unix() {
		t.Fatalf("tls_certificate_not_after_seconds %v, want %d", got, x2.NotAfter.Unix())
	}

	// Forwarded calls over TLS too.
	req, _ := http.NewRequest(http.MethodPost, base+"/v4/openim/sendmsg?"+callerQuery(sim, sim.Identifier(), sim.Key()), strings.NewReader(`{"x":1}`))
	resp, err := (&http.Client{Transport: h2}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if seen := sim.Seen(); len(seen) != 1 || !bytes.Equal(seen[0].Answer, raw) || string(seen[0].Body) != `{"x":1}` {
		t.Fatalf("forwarded over TLS: %s / %+v", raw, seen)
	}
}

// A certificate and key that do not load stop New with a clear error;
// so does one without the other.
func TestTLSConfigErrors(t *testing.T) {
	dir := t.TempDir()
	c1, _, _ := selfSigned(t, 1)
	_, k2, _ := selfSigned(t, 2)
	certFile, keyFile := filepath.Join(dir, "c"), filepath.Join(dir, "k")
	writeAtomic(t, certFile, c1)
	writeAtomic(t, keyFile, k2)
	sim, srv := simtest.Start(t, imsim.Config{})
	for _, cfg := range []proxy.Config{{TLSCert: certFile, TLSKey: keyFile}, {TLSCert: certFile}, {TLSCert: certFile, TLSKey: filepath.Join(dir, "missing")}} {
		cfg.Listen, cfg.AdminListen = "127.0.0.1:0", "-"
		cfg.Upstream, cfg.SDKAppID, cfg.AdminIdentifier, cfg.SecretKey = srv.URL, sim.SDKAppID(), sim.Identifier(), sim.Key()
		if p, err := proxy.New(cfg); err == nil || !strings.Contains(err.Error(), "tls") && !strings.Contains(err.Error(), "TLS") {
			t.Errorf("%+v: %v", cfg, err)
			if p != nil {
				t.Fatal("proxy built")
			}
		}
	}
}
