package redistier

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// ClientOptions are the Redis settings beyond the address.
type ClientOptions struct {
	// Password, when set, replaces the URL's password (so it can come
	// from a secret rather than the URL); the user stays the URL's
	// ("default" when the URL names none).
	Password string
	// CAFile is a PEM file of the roots that verify the servers' TLS
	// certificates (rediss://); empty means the system's roots.
	CAFile string
}

// clientTimeout bounds every dial, read, write and pool wait of a client.
const clientTimeout = 250 * time.Millisecond

// NewClient returns a client for the proxy's -redis flag:
//
//   - redis://[user:password@]host:port/db, or rediss:// for TLS: one server;
//   - redis://[user:password@]host:port,host:port,…, or rediss://…: a Redis
//     Cluster (its seed nodes) with AUTH and TLS, every node verified under
//     its own host name;
//   - host:port,host:port,…: a Redis Cluster without AUTH or TLS.
//
// Timeouts are short and retries off: a slow Redis must not slow lookups
// down. Errors never repeat the spec (it may hold a password).
func NewClient(spec string, o ClientOptions) (redis.UniversalClient, error) {
	var tlsConf *tls.Config
	var client func() redis.UniversalClient
	var err error
	if scheme, rest, ok := strings.Cut(spec, "://"); ok {
		tlsConf, client, err = urlClient(spec, scheme, rest, o)
	} else {
		tlsConf, client, err = addrsClient(spec, o)
	}
	if err != nil {
		return nil, err
	}
	if err := configureTLS(tlsConf, o.CAFile); err != nil {
		return nil, err
	}
	return client(), nil
}

// urlClient is NewClient for a redis:// or rediss:// spec (scheme://rest):
// one server, or a cluster when the URL names several hosts. It returns
// the client's TLS settings (nil: none) and how to make the client.
func urlClient(spec, scheme, rest string, o ClientOptions) (*tls.Config, func() redis.UniversalClient, error) {
	authority := rest
	if i := strings.IndexAny(authority, "/?"); i >= 0 {
		authority = authority[:i]
	}
	at := strings.LastIndexByte(authority, '@') + 1 // hosts start here
	hosts := authority[at:]
	if nodes := strings.Split(hosts, ","); len(nodes) > 1 {
		// ParseClusterURL takes the first node in the URL and the others
		// as addr parameters.
		u := scheme + "://" + rest[:at] + nodes[0] + rest[at+len(hosts):]
		sep := "?"
		if strings.Contains(u, "?") {
			sep = "&"
		}
		for _, n := range nodes[1:] {
			u += sep + "addr=" + url.QueryEscape(strings.TrimSpace(n))
			sep = "&"
		}
		opt, err := redis.ParseClusterURL(u)
		if err != nil {
			return nil, nil, fmt.Errorf("redistier: -redis is not a valid cluster URL: %w", redactURLError(err))
		}
		if opt.TLSConfig != nil {
			opt.TLSConfig.ServerName = "" // each node is verified under its own name
		}
		opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = clientTimeout, clientTimeout, clientTimeout, clientTimeout
		opt.MaxRetries, opt.DialerRetries, opt.ContextTimeoutEnabled = -1, 1, true
		if o.Password != "" {
			opt.Password = o.Password
		}
		return opt.TLSConfig, func() redis.UniversalClient { return redis.NewClusterClient(opt) }, nil
	}
	opt, err := redis.ParseURL(spec)
	if err != nil {
		return nil, nil, fmt.Errorf("redistier: -redis is not a valid URL: %w", redactURLError(err))
	}
	opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout, opt.PoolTimeout = clientTimeout, clientTimeout, clientTimeout, clientTimeout
	opt.MaxRetries = -1
	opt.DialerRetries = 1 // one dial per attempt: no retry loop on the request path
	opt.ContextTimeoutEnabled = true
	if o.Password != "" {
		opt.Password = o.Password
	}
	return opt.TLSConfig, func() redis.UniversalClient { return redis.NewClient(opt) }, nil
}

// addrsClient is NewClient for a host:port,… spec: a cluster without AUTH
// or TLS (beyond o.Password).
func addrsClient(spec string, o ClientOptions) (*tls.Config, func() redis.UniversalClient, error) {
	var addrs []string
	for _, a := range strings.Split(spec, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return nil, nil, errors.New("redistier: empty redis address list")
	}
	opt := &redis.ClusterOptions{Addrs: addrs, Password: o.Password,
		DialTimeout: clientTimeout, ReadTimeout: clientTimeout, WriteTimeout: clientTimeout, PoolTimeout: clientTimeout,
		MaxRetries: -1, DialerRetries: 1, ContextTimeoutEnabled: true}
	return opt.TLSConfig, func() redis.UniversalClient { return redis.NewClusterClient(opt) }, nil
}

// configureTLS sets the minimum version of conf (nil: no TLS) and, with a
// CA file, the roots that verify the servers.
func configureTLS(conf *tls.Config, caFile string) error {
	if conf != nil {
		conf.MinVersion = tls.VersionTLS12
	}
	if caFile == "" {
		return nil
	}
	if conf == nil {
		return errors.New("redistier: a Redis CA file needs TLS: use a rediss:// URL")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return fmt.Errorf("redistier: Redis CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("redistier: Redis CA file %s holds no PEM certificate", caFile)
	}
	conf.RootCAs = pool
	return nil
}

// redactURLError keeps a URL parse error's cause but not the URL, which
// may hold a password.
func redactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
