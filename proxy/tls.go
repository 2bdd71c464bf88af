package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// certReloader serves the API listener's certificate and loads it again
// when its files change (cert-manager and Kubernetes Secret volumes replace
// both files at once; a half-written pair does not parse and is retried at
// the next poll). New handshakes get the new certificate; connections
// already open keep theirs, so a rotation drops nothing. Run owns the
// polling goroutine.
type certReloader struct {
	certFile, keyFile string
	every             time.Duration
	log               *slog.Logger
	m                 *metrics.Metrics
	cert              atomic.Pointer[tls.Certificate]
	certPEM, keyPEM   []byte // as last loaded, to tell a change from a touch
	certStat, keyStat fileStamp
}

// fileStamp is what a poll compares before reading a file again.
type fileStamp struct {
	mod  time.Time
	size int64
}

func stampOf(path string) (fileStamp, error) {
	fi, err := os.Stat(path) // follows the Secret volume's symlinks
	if err != nil {
		return fileStamp{}, err
	}
	return fileStamp{fi.ModTime(), fi.Size()}, nil
}

func newCertReloader(certFile, keyFile string, every time.Duration, log *slog.Logger, m *metrics.Metrics) (*certReloader, error) {
	if every <= 0 {
		every = 10 * time.Second
	}
	c := &certReloader{certFile: certFile, keyFile: keyFile, every: every, log: log, m: m}
	if _, err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// load reads and parses both files; it reports whether they differ from
// what is served, and keeps what is served on error.
func (c *certReloader) load() (changed bool, err error) {
	cs, err1 := stampOf(c.certFile)
	ks, err2 := stampOf(c.keyFile)
	certPEM, err3 := os.ReadFile(c.certFile)
	keyPEM, err4 := os.ReadFile(c.keyFile)
	for _, e := range []error{err1, err2, err3, err4} {
		if e != nil {
			return false, fmt.Errorf("proxy: TLS certificate: %w", e)
		}
	}
	c.certStat, c.keyStat = cs, ks
	if bytes.Equal(certPEM, c.certPEM) && bytes.Equal(keyPEM, c.keyPEM) {
		return false, nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return false, fmt.Errorf("proxy: TLS certificate %s / key %s: %w", c.certFile, c.keyFile, err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return false, fmt.Errorf("proxy: TLS certificate %s: %w", c.certFile, err)
		}
	}
	c.certPEM, c.keyPEM = certPEM, keyPEM
	c.cert.Store(&cert)
	c.m.TLSNotAfter.Set(float64(cert.Leaf.NotAfter.Unix()))
	return true, nil
}

// getCertificate is tls.Config.GetCertificate.
func (c *certReloader) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cert.Load(), nil
}

// poll loads the files again if either one's time or size changed.
func (c *certReloader) poll() {
	cs, err1 := stampOf(c.certFile)
	ks, err2 := stampOf(c.keyFile)
	if err1 == nil && err2 == nil && cs == c.certStat && ks == c.keyStat {
		return
	}
	changed, err := c.load()
	switch {
	case err != nil:
		c.m.TLSReloads.WithLabelValues("error").Inc()
		c.log.Warn("TLS certificate files changed but do not load; still serving the previous certificate", "error", err.Error())
	case changed:
		c.m.TLSReloads.WithLabelValues("ok").Inc()
		leaf := c.cert.Load().Leaf
		c.log.Info("TLS certificate reloaded", "subject", leaf.Subject.String(), "not_after", leaf.NotAfter)
	}
}

// Run polls the files every c.every until ctx ends.
func (c *certReloader) Run(ctx context.Context) {
	t := time.NewTicker(c.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.poll()
		}
	}
}

// tlsConfig is the API listener's TLS configuration: HTTP/2 and
// HTTP/1.1, TLS 1.2 and up, the reloader's certificate, and session
// resumption (tickets; Go rotates their keys itself) so a client that
// closes its connection after every call does a short handshake.
func (c *certReloader) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"h2", "http/1.1"},
		GetCertificate: c.getCertificate,
	}
}
