package redistier

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/internal/redistest"
)

func ping(t *testing.T, spec string, o ClientOptions) error {
	t.Helper()
	c, err := NewClient(spec, o)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if cc, ok := c.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error { return n.Ping(ctx).Err() })
	}
	return c.Ping(ctx).Err()
}

// roundTrip writes and reads accounts through a tier on spec (the write
// script, HMGET pipelines), across cluster slots when it is a cluster.
func roundTrip(t *testing.T, spec string, o ClientOptions) {
	t.Helper()
	client, err := NewClient(spec, o)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	r, err := New(Config{Client: client, SDKAppID: 1400000000})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var accounts []string
	for i := range 20 {
		a := "auth" + strconv.Itoa(i)
		accounts = append(accounts, a)
		r.flush([]write{{a, testRecord(a, now)}})
	}
	got, err := r.Get(context.Background(), accounts, []string{nick})
	if err != nil || !r.Up() {
		t.Fatalf("read back: %v (up %v)", err, r.Up())
	}
	for i, rec := range got {
		if v, _ := rec.Tag(nick); string(v.Value) != strconv.Quote("nick-"+accounts[i]) {
			t.Fatalf("%s: %+v", accounts[i], rec)
		}
	}
}

// AUTH with the default user's password (in the URL or given apart) and
// with an ACL user; wrong or missing credentials fail.
func TestRedisAuthAndACLUser(t *testing.T) {
	srv := redistest.Start(t, "--requirepass", "pw-default", "--user", "proxy", "on", ">pw-proxy", "~pp:*", "&*", "+@all")
	a := srv.Addr()
	for _, c := range []struct {
		spec string
		o    ClientOptions
		ok   bool
	}{
		{"redis://" + a + "/0", ClientOptions{}, false},
		{"redis://" + a + "/0", ClientOptions{Password: "pw-default"}, true},
		{"redis://:pw-default@" + a + "/0", ClientOptions{}, true},
		{"redis://proxy:pw-proxy@" + a + "/0", ClientOptions{}, true},
		{"redis://proxy:wrong@" + a + "/0", ClientOptions{}, false},
		{"redis://proxy@" + a + "/0", ClientOptions{Password: "pw-proxy"}, true},
	} {
		if err := ping(t, c.spec, c.o); (err == nil) != c.ok {
			t.Errorf("%s %+v: %v, want ok %v", c.spec, c.o, err, c.ok)
		}
	}
	roundTrip(t, "redis://proxy:pw-proxy@"+a+"/0", ClientOptions{})
	// The ACL user may touch only pp:* keys: the tier keeps to them.
	if reply, err := srv.Do("ACL", "DRYRUN", "proxy", "GET", "other"); err != nil || reply == "OK" {
		t.Fatal("the ACL user may read keys outside pp:*; the test proves nothing")
	}
}

func TestRedisURLErrorsHideThePassword(t *testing.T) {
	for _, spec := range []string{"redis://u:s3cret@host:notaport/0", "redis://u:s3cret@h1:1,h2:2?dial_timeout=soon", "http://u:s3cret@host:1/0", "redis://u:s3cret@host:1/notadb"} {
		_, err := NewClient(spec, ClientOptions{})
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: %v", spec, err)
		}
	}
}

// A cluster with AUTH: the password in the URL or given apart, every
// master answering, writes and reads across slots.
func TestRedisClusterAuth(t *testing.T) {
	cl := redistest.StartCluster(t, 3, "--requirepass", "pw", "--masterauth", "pw")
	if err := ping(t, cl.Addrs(), ClientOptions{}); err == nil {
		t.Fatal("cluster without the password answered")
	}
	if err := ping(t, cl.Addrs(), ClientOptions{Password: "pw"}); err != nil {
		t.Fatal(err)
	}
	url := "redis://:pw@" + cl.Addrs()
	if err := ping(t, url, ClientOptions{}); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, url, ClientOptions{})
}

// selfSigned writes a CA-less self-signed certificate for 127.0.0.1 and its
// key, and returns their paths.
func selfSigned(t *testing.T) (cert, key string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "redis-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// rediss:// to a real TLS redis-server, verified against the given CA;
// without the CA (an unknown authority) or without TLS it fails.
func TestRedisTLS(t *testing.T) {
	cert, key := selfSigned(t)
	port := freeLoopbackPort(t)
	redistest.Start(t, "--tls-port", port, "--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no",
		"--requirepass", "pw")
	spec := "rediss://:pw@127.0.0.1:" + port + "/0"
	if err := ping(t, spec, ClientOptions{CAFile: cert}); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, spec, ClientOptions{CAFile: cert})
	if err := ping(t, spec, ClientOptions{}); err == nil {
		t.Fatal("a certificate of an unknown authority was accepted")
	}
	if err := ping(t, "redis://:pw@127.0.0.1:"+port+"/0", ClientOptions{}); err == nil {
		t.Fatal("plain text to the TLS port answered")
	}
	if _, err := NewClient("redis://127.0.0.1:"+port+"/0", ClientOptions{CAFile: cert}); err == nil {
		t.Fatal("a CA file without TLS was accepted")
	}
}

// The cluster URL form carries AUTH and TLS to every node, each verified
// under its own host name.
func TestRedisClusterURLOptions(t *testing.T) {
	cert, _ := selfSigned(t)
	c, err := NewClient("rediss://proxy:pw@10.0.0.1:7000,10.0.0.2:7001, 10.0.0.3:7002?dial_timeout=1s", ClientOptions{CAFile: cert})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cc, ok := c.(*redis.ClusterClient)
	if !ok {
		t.Fatalf("%T, want a cluster client", c)
	}
	o := cc.Options()
	if strings.Join(o.Addrs, ",") != "10.0.0.1:7000,10.0.0.2:7001,10.0.0.3:7002" || o.Username != "proxy" || o.Password != "pw" {
		t.Fatalf("addrs %v user %q password set %v", o.Addrs, o.Username, o.Password != "")
	}
	if o.TLSConfig == nil || o.TLSConfig.RootCAs == nil || o.TLSConfig.ServerName != "" || o.TLSConfig.MinVersion < 0x0303 {
		t.Fatalf("TLS config %+v", o.TLSConfig)
	}
	if o.MaxRetries != -1 || o.ReadTimeout != 250*time.Millisecond {
		t.Fatalf("retries %d, read timeout %v", o.MaxRetries, o.ReadTimeout)
	}
	single, err := NewClient("rediss://u:p@host.example:6380/2", ClientOptions{Password: "from-env"})
	if err != nil {
		t.Fatal(err)
	}
	defer single.Close()
	so := single.(*redis.Client).Options()
	if so.Username != "u" || so.Password != "from-env" || so.DB != 2 || so.TLSConfig == nil || so.TLSConfig.ServerName != "host.example" {
		t.Fatalf("single: %+v", so)
	}
}
