// Package upstream is the client of the IM REST API's profile calls
// (v4/profile/portrait_get and portrait_set).
//
// A Client signs every call with the admin UserSig from a usersig.Signer,
// adds a fresh random request id, keeps connections alive, and bounds each
// call by a timeout longer than the upstream's own 3 s. It never follows
// redirects (they would carry the UserSig elsewhere). Every failure is
// returned as an *Error that says what kind it is (see im.Kind); no error text
// holds the UserSig. A Client is safe for concurrent use.
package upstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// maxResponseBytes caps an answer: 100 accounts × a dozen 500-byte tags is
// well under 1 MiB.
const maxResponseBytes = 16 << 20

// DefaultTimeout bounds one call when Config.Timeout is zero: longer than
// the upstream's own 3s, so its answer, not ours, ends a slow call.
const DefaultTimeout = 5 * time.Second

// Config configures a Client. BaseURL and Signer are required.
type Config struct {
	// BaseURL is the region host, e.g. "https://console.tim.qq.com" or
	// "https://adminapisgp.im.qcloud.com"; a path prefix is kept.
	BaseURL string
	// Signer provides the admin identifier, SDKAppID and UserSig.
	Signer *usersig.Signer
	// Timeout bounds one call. Zero means DefaultTimeout.
	Timeout time.Duration
	// Transport carries the calls. Nil means a keep-alive pool sized for
	// a few hundred calls in flight.
	Transport http.RoundTripper
	// Observe, if set, is told of every HTTP call made: the Kind of its
	// outcome, its duration and its error (nil when OK; the text holds no
	// UserSig). It is called exactly once per call.
	Observe func(kind im.Kind, d time.Duration, err error)
}

// Client calls the IM REST API. Create it with New.
type Client struct {
	base    *url.URL
	signer  *usersig.Signer
	timeout time.Duration
	http    *http.Client
	observe func(im.Kind, time.Duration, error)
}

// New validates cfg and returns a Client.
func New(cfg Config) (*Client, error) {
	if cfg.Signer == nil {
		return nil, errors.New("upstream: Config.Signer is required")
	}
	u, err := url.Parse(cfg.BaseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("upstream: base URL %q is not an http(s) URL", cfg.BaseURL)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	tr := cfg.Transport
	if tr == nil {
		tr = NewTransport()
	}
	obs := cfg.Observe
	if obs == nil {
		obs = func(im.Kind, time.Duration, error) {}
	}
	return &Client{
		base:    u,
		signer:  cfg.Signer,
		timeout: cfg.Timeout,
		observe: obs,
		http: &http.Client{
			Transport:     tr,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}, nil
}

// NewTransport returns the keep-alive transport New uses by default.
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 3 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          512,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   5 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: 10 * time.Second,
	}
}

// Error is a failed call. Kind says what to do about it; Code is the IM
// error code when the upstream answered with one.
type Error struct {
	Kind   im.Kind
	Code   int    // IM ErrorCode, for im.KindThrottled, im.KindAuth, im.KindNotFound, im.KindTransient, im.KindRejected
	Status int    // HTTP status, for im.KindHTTP
	Info   string // the upstream's ErrorInfo, or a description
	Err    error  // the cause, for im.KindTransport; its text holds no UserSig
}

func (e *Error) Error() string {
	switch {
	case e.Err != nil:
		return "upstream: " + e.Kind.String() + ": " + e.Err.Error()
	case e.Status != 0:
		return fmt.Sprintf("upstream: http status %d", e.Status)
	default:
		return fmt.Sprintf("upstream: %s: code %d: %s", e.Kind, e.Code, e.Info)
	}
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the Kind of err: an *Error's Kind, KindOK for nil, and
// KindTransport for anything else.
func KindOf(err error) im.Kind {
	var e *Error
	switch {
	case err == nil:
		return im.KindOK
	case errors.As(err, &e):
		return e.Kind
	default:
		return im.KindTransport
	}
}

// PortraitGet fetches tags for up to MaxAccountsPerCall accounts. It returns
// the answer when ErrorCode is 0 (per-account failures are in the items and
// Fail_Account), and an *Error otherwise. ctx bounds the call together with
// the Client's timeout.
func (c *Client) PortraitGet(ctx context.Context, req im.GetRequest) (*im.GetResponse, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("upstream: encode request: %w", err)
	}
	var resp im.GetResponse
	if err := c.call(ctx, im.PathGet, body, &resp, func() (int, string) { return resp.ErrorCode, resp.ErrorInfo }); err != nil {
		if resp.ErrorCode != 0 {
			return &resp, err
		}
		return nil, err
	}
	return &resp, nil
}

// PortraitSet writes profile items for one account. It returns nil when the
// upstream answered ErrorCode 0, and an *Error otherwise.
func (c *Client) PortraitSet(ctx context.Context, req im.SetRequest) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("upstream: encode request: %w", err)
	}
	var resp im.Envelope
	return c.call(ctx, im.PathSet, body, &resp, func() (int, string) { return resp.ErrorCode, resp.ErrorInfo })
}

func (c *Client) endpoint(path string) (full, redacted string) {
	q := url.Values{}
	q.Set("sdkappid", strconv.FormatUint(c.signer.SDKAppID(), 10))
	q.Set("identifier", c.signer.Identifier())
	q.Set("random", strconv.FormatUint(uint64(rand.Uint32()), 10))
	q.Set("contenttype", "json")
	u := *c.base
	u.Path += path
	u.RawQuery = q.Encode() + "&usersig=REDACTED"
	redacted = u.String()
	u.RawQuery = q.Encode() + "&usersig=" + url.QueryEscape(c.signer.Sig())
	return u.String(), redacted
}

// call posts body and decodes a 200 answer into out, returning an *Error
// when status (read after decoding) gives a non-zero ErrorCode. It reports
// the call to observe exactly once.
func (c *Client) call(ctx context.Context, path string, body []byte, out any, status func() (code int, info string)) (err error) {
	start := time.Now()
	defer func() { c.observe(KindOf(err), time.Since(start), err) }()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	full, redacted := c.endpoint(path)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, full, bytes.NewReader(body))
	if err != nil {
		return &Error{Kind: im.KindTransport, Err: redact(err, full, redacted)}
	}
	hreq.Header.Set("Content-Type", "application/json")
	hresp, err := c.http.Do(hreq)
	if err != nil {
		return &Error{Kind: im.KindTransport, Err: redact(err, full, redacted)}
	}
	defer hresp.Body.Close()
	if hresp.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(hresp.Body, 64<<10)) // keep the connection reusable
		return &Error{Kind: im.KindHTTP, Status: hresp.StatusCode}
	}
	raw, err := io.ReadAll(io.LimitReader(hresp.Body, maxResponseBytes+1))
	if err != nil {
		return &Error{Kind: im.KindTransport, Err: redact(err, full, redacted)}
	}
	if len(raw) > maxResponseBytes {
		return &Error{Kind: im.KindTransport, Err: fmt.Errorf("answer longer than %d bytes", maxResponseBytes)}
	}
	if r, ok := out.(*im.GetResponse); ok {
		err = decodeGet(raw, r)
	} else {
		err = json.Unmarshal(raw, out)
	}
	if err != nil {
		return &Error{Kind: im.KindTransport, Err: fmt.Errorf("decode answer: %v", err)}
	}
	if code, info := status(); code != 0 {
		return &Error{Kind: im.Classify(code), Code: code, Info: info}
	}
	return nil
}

// redact returns err with the full URL (which carries the UserSig) replaced
// by its redacted form, wherever Go's HTTP stack put it.
func redact(err error, full, redacted string) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return &url.Error{Op: ue.Op, URL: redacted, Err: redact(ue.Err, full, redacted)}
	}
	if strings.Contains(err.Error(), full) {
		return errors.New(strings.ReplaceAll(err.Error(), full, redacted))
	}
	return err
}

// ThrottlePause is how long to pause all calls after the throttling error
// err: im.SigFailureRetryAfter for 70050, base for the others.
func ThrottlePause(err error, base time.Duration) time.Duration {
	var ue *Error
	if errors.As(err, &ue) && ue.Code == im.CodeSigFailureLimit {
		return max(base, im.SigFailureRetryAfter)
	}
	return base
}
