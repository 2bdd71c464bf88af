// Package usersig signs and verifies IM UserSigs in the TLSSigAPIv2 format.
//
// A UserSig is a JSON document carrying the identifier, SDKAppID, issue time,
// lifetime and an HMAC-SHA256 over those fields keyed with the app's secret
// key. The document is zlib-compressed and encoded with a URL-safe variant of
// base64 ('+' → '*', '/' → '-', '=' → '_').
//
// Sign and Verify are pure functions, safe for concurrent use. Verify is
// stricter than the official library: the HMAC is compared in constant time,
// the decompressed document is capped at MaxDecodedSize bytes, and malformed
// JSON is reported as such. Signer keeps one admin sig and renews it well
// before it expires; it is safe for concurrent use.
package usersig

import (
	"bytes"
	"compress/zlib"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// MaxEncodedSize caps the length of a UserSig string that Verify accepts.
// Real sigs are a few hundred bytes.
const MaxEncodedSize = 4096

// MaxDecodedSize caps the decompressed JSON document, so a zlib bomb costs
// at most this many bytes of work.
const MaxDecodedSize = 4096

// Errors returned by Verify. Each maps to one IM error code (see Code).
var (
	ErrEmpty       = errors.New("usersig: empty")
	ErrMalformed   = errors.New("usersig: malformed")
	ErrExpired     = errors.New("usersig: expired")
	ErrBadSig      = errors.New("usersig: signature mismatch")
	ErrIdentifier  = errors.New("usersig: identifier does not match")
	ErrSDKAppID    = errors.New("usersig: sdkappid does not match")
	ErrUnsupported = errors.New("usersig: unsupported version")
)

// Code returns the IM REST API error code for a Verify error, or 0 for nil.
func Code(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrEmpty):
		return 70002
	case errors.Is(err, ErrExpired):
		return 70001
	case errors.Is(err, ErrBadSig):
		return 70009
	case errors.Is(err, ErrIdentifier):
		return 70013
	case errors.Is(err, ErrSDKAppID):
		return 70014
	default: // ErrMalformed, ErrUnsupported
		return 70003
	}
}

var urlEncoding = strings.NewReplacer("+", "*", "/", "-", "=", "_")
var urlDecoding = strings.NewReplacer("*", "+", "-", "/", "_", "=")

func mac(key, identifier string, sdkAppID uint64, issued, expire int64) string {
	content := "TLS.identifier:" + identifier + "\n" +
		"TLS.sdkappid:" + strconv.FormatUint(sdkAppID, 10) + "\n" +
		"TLS.time:" + strconv.FormatInt(issued, 10) + "\n" +
		"TLS.expire:" + strconv.FormatInt(expire, 10) + "\n"
	h := hmac.New(sha256.New, []byte(key))
	h.Write([]byte(content))
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}

type doc struct {
	Ver        string `json:"TLS.ver"`
	Identifier string `json:"TLS.identifier"`
	SDKAppID   uint64 `json:"TLS.sdkappid"`
	Expire     int64  `json:"TLS.expire"`
	Time       int64  `json:"TLS.time"`
	Sig        string `json:"TLS.sig"`
}

// Sign returns a UserSig for identifier in app sdkAppID, issued at now and
// valid for ttl (whole seconds), signed with key.
func Sign(key string, sdkAppID uint64, identifier string, now time.Time, ttl time.Duration) string {
	d := doc{Ver: "2.0", Identifier: identifier, SDKAppID: sdkAppID,
		Expire: int64(ttl / time.Second), Time: now.Unix()}
	d.Sig = mac(key, identifier, sdkAppID, d.Time, d.Expire)
	raw, _ := json.Marshal(d) // cannot fail: plain fields
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	w.Write(raw)
	w.Close()
	return urlEncoding.Replace(base64.StdEncoding.EncodeToString(buf.Bytes()))
}

// Claims are the verified fields of a UserSig.
type Claims struct {
	Identifier string
	SDKAppID   uint64
	Issued     time.Time
	Expires    time.Time
}

// Verify checks sig against key, the expected app and identifier, at time now.
// It returns the sig's claims, or an error wrapping one of the Err values.
// Verify never panics, whatever sig holds.
func Verify(sig, key string, sdkAppID uint64, identifier string, now time.Time) (Claims, error) {
	if sig == "" {
		return Claims{}, ErrEmpty
	}
	if len(sig) > MaxEncodedSize {
		return Claims{}, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, MaxEncodedSize)
	}
	compressed, err := base64.StdEncoding.DecodeString(urlDecoding.Replace(sig))
	if err != nil {
		return Claims{}, fmt.Errorf("%w: base64: %v", ErrMalformed, err)
	}
	zr, err := zlib.NewReader(bytes.NewReader(compressed))
	if err != nil {
		return Claims{}, fmt.Errorf("%w: zlib: %v", ErrMalformed, err)
	}
	raw, err := io.ReadAll(io.LimitReader(zr, MaxDecodedSize+1))
	if err != nil {
		return Claims{}, fmt.Errorf("%w: zlib: %v", ErrMalformed, err)
	}
	if len(raw) > MaxDecodedSize {
		return Claims{}, fmt.Errorf("%w: decompresses to more than %d bytes", ErrMalformed, MaxDecodedSize)
	}
	var d doc
	if err := json.Unmarshal(raw, &d); err != nil {
		return Claims{}, fmt.Errorf("%w: json: %v", ErrMalformed, err)
	}
	if d.Ver != "2.0" {
		return Claims{}, fmt.Errorf("%w: %q", ErrUnsupported, d.Ver)
	}
	if d.SDKAppID != sdkAppID {
		return Claims{}, ErrSDKAppID
	}
	if d.Identifier != identifier {
		return Claims{}, ErrIdentifier
	}
	want := mac(key, d.Identifier, d.SDKAppID, d.Time, d.Expire)
	if !hmac.Equal([]byte(want), []byte(d.Sig)) {
		return Claims{}, ErrBadSig
	}
	if now.Unix() > d.Time+d.Expire {
		return Claims{}, ErrExpired
	}
	return Claims{Identifier: d.Identifier, SDKAppID: d.SDKAppID,
		Issued:  time.Unix(d.Time, 0),
		Expires: time.Unix(d.Time+d.Expire, 0)}, nil
}

// Signer hands out the admin UserSig for upstream calls. It signs once and
// renews when less than a quarter of the lifetime is left, so a sig in use
// never expires mid-flight. The zero value is not usable; use NewSigner.
// A Signer is safe for concurrent use.
type Signer struct {
	key        string
	sdkAppID   uint64
	identifier string
	ttl        time.Duration
	now        func() time.Time

	mu      sync.Mutex
	sig     string
	renewAt time.Time
}

// NewSigner returns a Signer for identifier in sdkAppID. ttl ≤ 0 means 24h;
// now nil means time.Now.
func NewSigner(key string, sdkAppID uint64, identifier string, ttl time.Duration, now func() time.Time) *Signer {
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	if now == nil {
		now = time.Now
	}
	return &Signer{key: key, sdkAppID: sdkAppID, identifier: identifier, ttl: ttl, now: now}
}

// Identifier returns the admin identifier the Signer signs for.
func (s *Signer) Identifier() string { return s.identifier }

// SDKAppID returns the app the Signer signs for.
func (s *Signer) SDKAppID() uint64 { return s.sdkAppID }

// Sig returns a valid sig, signing a new one when the current one is within
// a quarter of its lifetime of expiring.
func (s *Signer) Sig() string {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sig == "" || !now.Before(s.renewAt) {
		s.sig = Sign(s.key, s.sdkAppID, s.identifier, now, s.ttl)
		s.renewAt = now.Add(s.ttl - s.ttl/4)
	}
	return s.sig
}
