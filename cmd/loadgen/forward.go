package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// forwardResult is the forwarding and TLS scenario.
type forwardResult struct {
	direct1, via1       []time.Duration // one caller, sorted
	directRate, viaRate float64         // calls/s, forwardCallers callers
	cpuPerCall          float64         // proxy CPU seconds per forwarded call
	tls                 []tlsResult
}

type tlsResult struct {
	name       string
	calls      int
	resumed    int // connections that resumed a TLS session
	p50, p99   time.Duration
	cpuPerCall float64 // proxy CPU seconds per call
}

const (
	forwardCallers = 32
	tlsCallers     = 8
	// sendmsgBody is what an SDK's sendmsg carries, about 260 bytes.
	sendmsgBody = `{"SyncOtherMachine":2,"From_Account":"user1","To_Account":"user2","MsgLifeTime":604800,"MsgRandom":1287657,` +
		`"MsgBody":[{"MsgType":"TIMTextElem","MsgContent":{"Text":"hello, this is a message of a typical length for a chat app"}}],` +
		`"CloudCustomData":"{\"k\":1}"}`
)

// forward measures what forwarding adds to a call (the emulator answers
// at once, so the difference is the proxy's hop), the proxy's CPU per
// forwarded call, and what a TLS handshake per call costs a client that
// does not keep connections alive, with and without session resumption.
func forward(o options, out io.Writer) error {
	sim, err := startProc(filepath.Join(o.bin, "imsim"), []string{"-listen", "127.0.0.1:0", "-quota", "-1", "-api-quota", "-1"},
		[]string{"IMSIM_SECRET_KEY=" + simKey}, 1)
	if err != nil {
		return err
	}
	defer sim.stop()
	simURL := "http://" + sim.addrs[0]
	dir, err := os.MkdirTemp("", "loadgen-tls")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	roots := x509.NewCertPool()
	var procs []*proc
	defer func() {
		for _, p := range procs {
			p.stop()
		}
	}()
	startProxy := func(extra ...string) (*proc, error) {
		p, err := startProc(filepath.Join(o.bin, "proxy"), append([]string{"-listen", "127.0.0.1:0", "-admin-listen", "127.0.0.1:0",
			"-upstream", simURL, "-sdkappid", strconv.Itoa(simApp), "-rate", strconv.Itoa(o.quota), "-log-level", "warn"}, extra...),
			[]string{"PROXY_SECRET_KEY=" + simKey}, 2)
		if err == nil {
			procs = append(procs, p)
		}
		return p, err
	}
	plain, err := startProxy()
	if err != nil {
		return err
	}
	tlsProxy := map[string]*proc{}
	for _, kind := range []string{"ECDSA P-256", "RSA 2048"} {
		certFile, keyFile, err := writeCert(dir, kind, roots)
		if err != nil {
			return err
		}
		if tlsProxy[kind], err = startProxy("-tls-cert", certFile, "-tls-key", keyFile); err != nil {
			return err
		}
	}
	q := signedQuery()
	direct, via := simURL+"/v4/openim/sendmsg"+q, "http://"+plain.addrs[0]+"/v4/openim/sendmsg"+q
	r := &forwardResult{}

	// One caller, alternating rounds, so both sides see the same machine.
	for range 4 {
		for _, side := range []struct {
			url string
			lat *[]time.Duration
		}{{direct, &r.direct1}, {via, &r.via1}} {
			lat, err := sequential(side.url, 500)
			if err != nil {
				return err
			}
			*side.lat = append(*side.lat, lat...)
		}
	}
	slices.Sort(r.direct1)
	slices.Sort(r.via1)
	d := o.duration / 2
	if r.directRate, _, err = closedLoop(direct, forwardCallers, d); err != nil {
		return err
	}
	cpu0 := plain.cpu()
	var calls int
	if r.viaRate, calls, err = closedLoop(via, forwardCallers, d); err != nil {
		return err
	}
	r.cpuPerCall = (plain.cpu() - cpu0).Seconds() / float64(calls)

	// TLS: a hot lookup per call (the account cached), each on a new
	// connection or on kept-alive ones.
	body := `{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`
	variants := []struct {
		name      string
		p         *proc
		scheme    string
		keepAlive bool
		resume    bool
	}{
		{"plain HTTP, kept-alive connections", plain, "http", true, false},
		{"plain HTTP, a new connection per call", plain, "http", false, false},
		{"TLS (ECDSA P-256), kept-alive connections", tlsProxy["ECDSA P-256"], "https", true, false},
		{"TLS (ECDSA P-256), new connection, full handshake", tlsProxy["ECDSA P-256"], "https", false, false},
		{"TLS (ECDSA P-256), new connection, session resumed", tlsProxy["ECDSA P-256"], "https", false, true},
		{"TLS (RSA 2048), new connection, full handshake", tlsProxy["RSA 2048"], "https", false, false},
		{"TLS (RSA 2048), new connection, session resumed", tlsProxy["RSA 2048"], "https", false, true},
	}
	for _, v := range variants {
		u := v.scheme + "://" + v.p.addrs[0] + im.PathGet + q
		res, err := tlsLoop(v.name, v.p, u, body, roots, v.keepAlive, v.resume, d/2)
		if err != nil {
			return fmt.Errorf("%s: %w", v.name, err)
		}
		r.tls = append(r.tls, res)
	}
	rep.forward = r
	fmt.Fprintf(out, "forwarded calls (sendmsg, %d-byte body; the emulator answers at once)\n", len(sendmsgBody))
	fmt.Fprintf(out, "  one caller, %d calls each: direct p50 %v p99 %v; through the proxy p50 %v p99 %v (added p50 %v)\n", len(r.via1),
		pct(r.direct1, .5).Round(time.Microsecond), pct(r.direct1, .99).Round(time.Microsecond),
		pct(r.via1, .5).Round(time.Microsecond), pct(r.via1, .99).Round(time.Microsecond), (pct(r.via1, .5) - pct(r.direct1, .5)).Round(time.Microsecond))
	fmt.Fprintf(out, "  %d callers: direct %.0f calls/s, through the proxy %.0f calls/s, proxy CPU %.0f µs per forwarded call\n\n",
		forwardCallers, r.directRate, r.viaRate, r.cpuPerCall*1e6)
	fmt.Fprintf(out, "TLS handshake per call (hot portrait_get, %d callers, %v each)\n", tlsCallers, d/2)
	for _, t := range r.tls {
		fmt.Fprintf(out, "  %-55s %6d calls  resumed %5d  p50 %8v  p99 %8v  proxy CPU %5.0f µs/call\n", t.name, t.calls, t.resumed,
			t.p50.Round(time.Microsecond), t.p99.Round(time.Microsecond), t.cpuPerCall*1e6)
	}
	fmt.Fprintln(out)
	return nil
}

// sequential makes n calls one after the other on one kept-alive
// connection and returns their latencies.
func sequential(url string, n int) ([]time.Duration, error) {
	c, err := newRawConn(url)
	if err != nil {
		return nil, err
	}
	defer c.close()
	lat := make([]time.Duration, 0, n)
	for range n {
		t0 := time.Now()
		got, err := c.post(sendmsgBody)
		if err != nil {
			return nil, err
		}
		if !bytes.Contains(got, []byte(`"ErrorCode":0`)) {
			return nil, fmt.Errorf("answer %s", got)
		}
		lat = append(lat, time.Since(t0))
	}
	return lat, nil
}

// closedLoop runs callers kept-alive callers for d and returns calls/s and
// the calls made.
func closedLoop(url string, callers int, d time.Duration) (float64, int, error) {
	var mu sync.Mutex
	var total int
	var first error
	var wg sync.WaitGroup
	start := time.Now()
	for range callers {
		wg.Go(func() {
			c, err := newRawConn(url)
			if err != nil {
				return
			}
			defer c.close()
			n := 0
			for time.Since(start) < d {
				got, err := c.post(sendmsgBody)
				if err == nil && !bytes.Contains(got, []byte(`"ErrorCode":0`)) {
					err = fmt.Errorf("answer %s", got)
				}
				if err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
				n++
			}
			mu.Lock()
			total += n
			mu.Unlock()
		})
	}
	wg.Wait()
	return float64(total) / time.Since(start).Seconds(), total, first
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// tlsLoop runs tlsCallers net/http callers against url for d, on new
// connections (keepAlive false) or kept-alive ones, with or without a
// client session cache, and measures latency and the proxy's CPU.
func tlsLoop(name string, p *proc, url, body string, roots *x509.CertPool, keepAlive, resume bool, d time.Duration) (tlsResult, error) {
	res := tlsResult{name: name}
	tc := &tls.Config{RootCAs: roots}
	if resume {
		tc.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	tr := &http.Transport{DisableKeepAlives: !keepAlive, TLSClientConfig: tc, MaxIdleConnsPerHost: tlsCallers,
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}} // HTTP/1.1, as the SDKs that close connections speak
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	call := func() (bool, error) {
		resp, err := client.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			return false, err
		}
		raw, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || !bytes.Contains(raw, []byte(`"ErrorCode":0`)) {
			return false, errors.Join(err, fmt.Errorf("HTTP %d %s", resp.StatusCode, raw))
		}
		return resp.TLS != nil && resp.TLS.DidResume, nil
	}
	for range tlsCallers { // warm: the account cached, sessions to resume
		if _, err := call(); err != nil {
			return res, err
		}
	}
	var mu sync.Mutex
	var lat []time.Duration
	var first error
	var wg sync.WaitGroup
	cpu0 := p.cpu()
	start := time.Now()
	for range tlsCallers {
		wg.Go(func() {
			var mine []time.Duration
			resumed := 0
			for time.Since(start) < d {
				t0 := time.Now()
				r, err := call()
				if err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(t0))
				if r {
					resumed++
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			res.resumed += resumed
			mu.Unlock()
		})
	}
	wg.Wait()
	if first != nil {
		return res, first
	}
	slices.Sort(lat)
	res.calls = len(lat)
	res.p50, res.p99 = pct(lat, .5), pct(lat, .99)
	res.cpuPerCall = (p.cpu() - cpu0).Seconds() / float64(max(1, res.calls))
	return res, nil
}

// writeCert writes a self-signed certificate for 127.0.0.1 with a key of
// kind into dir, adds it to roots and returns the two file names.
func writeCert(dir, kind string, roots *x509.CertPool) (certFile, keyFile string, err error) {
	var key crypto.Signer
	if strings.HasPrefix(kind, "RSA") {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	} else {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "loadgen " + kind},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return "", "", err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return "", "", err
	}
	roots.AddCert(cert)
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", err
	}
	name := strings.NewReplacer(" ", "-").Replace(kind)
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
}

// writeForward is the report's section for the forward scenario.
func (r *report) writeForward(p func(string, ...any)) {
	f := r.forward
	if f == nil {
		return
	}
	p("## Forwarded calls and TLS\n\n")
	p("Every other `/v4/...` API is forwarded unchanged. Measured with a %d-byte sendmsg body against an emulator that\n", len(sendmsgBody))
	p("answers at once, so the difference is the proxy's hop (loopback, same machine; direct and through the proxy\n")
	p("alternated in four rounds of 500 calls on one kept-alive connection).\n\n")
	p("| | p50 | p99 | calls/s (%d callers) |\n|---|---|---|---|\n", forwardCallers)
	p("| straight to the upstream | %s | %s | %s |\n", ms(pct(f.direct1, .5)), ms(pct(f.direct1, .99)), thousands(f.directRate))
	p("| through the proxy | %s | %s | %s |\n\n", ms(pct(f.via1, .5)), ms(pct(f.via1, .99)), thousands(f.viaRate))
	p("Added latency p50 %s; proxy CPU %.0f µs per forwarded call.\n\n", ms(pct(f.via1, .5)-pct(f.direct1, .5)), f.cpuPerCall*1e6)
	p("A TLS handshake per call, for a client that does not keep connections alive (one SDK closes its connection\n")
	p("after every call): a hot portrait_get (the account cached), %d callers over HTTP/1.1.\n\n", tlsCallers)
	p("| client | calls | resumed | p50 | p99 | proxy CPU per call |\n|---|---|---|---|---|---|\n")
	for _, t := range f.tls {
		p("| %s | %d | %d | %s | %s | %.0f µs |\n", t.name, t.calls, t.resumed, ms(t.p50), ms(t.p99), t.cpuPerCall*1e6)
	}
	p("\n")
}
