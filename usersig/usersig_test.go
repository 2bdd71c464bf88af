package usersig

import (
	"bytes"
	"compress/zlib"
	"encoding/base64"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

const key = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"

var t0 = time.Unix(1_700_000_000, 0)

func encode(raw []byte) string {
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	w.Write(raw)
	w.Close()
	return urlEncoding.Replace(base64.StdEncoding.EncodeToString(buf.Bytes()))
}

func TestVerify(t *testing.T) {
	good := Sign(key, 1400000000, "administrator", t0, 24*time.Hour)
	tampered := func() string {
		// Flip the identifier inside the document but keep the old HMAC.
		c, _ := base64.StdEncoding.DecodeString(urlDecoding.Replace(good))
		zr, _ := zlib.NewReader(bytes.NewReader(c))
		var raw bytes.Buffer
		raw.ReadFrom(zr)
		return encode(bytes.Replace(raw.Bytes(), []byte(`"TLS.expire":86400`), []byte(`"TLS.expire":86401`), 1))
	}()
	bomb := encode(bytes.Repeat([]byte{' '}, 10<<20))
	tests := []struct {
		name     string
		sig      string
		key      string
		app      uint64
		id       string
		now      time.Time
		want     error
		wantCode int
	}{
		{"valid", good, key, 1400000000, "administrator", t0.Add(time.Hour), nil, 0},
		{"valid at last second", good, key, 1400000000, "administrator", t0.Add(24 * time.Hour), nil, 0},
		{"expired", good, key, 1400000000, "administrator", t0.Add(24*time.Hour + time.Second), ErrExpired, 70001},
		{"empty", "", key, 1400000000, "administrator", t0, ErrEmpty, 70002},
		{"wrong key", good, key + "x", 1400000000, "administrator", t0, ErrBadSig, 70009},
		{"tampered", tampered, key, 1400000000, "administrator", t0, ErrBadSig, 70009},
		{"wrong identifier", good, key, 1400000000, "admin2", t0, ErrIdentifier, 70013},
		{"wrong app", good, key, 1400000001, "administrator", t0, ErrSDKAppID, 70014},
		{"garbage", "!!!not base64!!!", key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"base64 not zlib", urlEncoding.Replace(base64.StdEncoding.EncodeToString([]byte("hello world"))), key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"zlib not json", encode([]byte("{not json")), key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"json wrong types", encode([]byte(`{"TLS.ver":"2.0","TLS.sdkappid":"x"}`)), key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"old version", encode([]byte(`{"TLS.ver":"1.0"}`)), key, 1400000000, "administrator", t0, ErrUnsupported, 70003},
		{"zlib bomb", bomb, key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"too long", strings.Repeat("a", MaxEncodedSize+1), key, 1400000000, "administrator", t0, ErrMalformed, 70003},
		{"truncated", good[:len(good)/2], key, 1400000000, "administrator", t0, ErrMalformed, 70003},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Verify(tt.sig, tt.key, tt.app, tt.id, tt.now)
			if !errors.Is(err, tt.want) || (tt.want == nil && err != nil) {
				t.Fatalf("Verify = %v, want %v", err, tt.want)
			}
			if got := Code(err); got != tt.wantCode {
				t.Errorf("Code = %d, want %d", got, tt.wantCode)
			}
			if err == nil && (c.Identifier != "administrator" || c.SDKAppID != 1400000000 || !c.Expires.Equal(t0.Add(24*time.Hour))) {
				t.Errorf("claims = %+v", c)
			}
		})
	}
	if len(bomb) > MaxEncodedSize {
		t.Logf("bomb is %d bytes encoded; the length cap caught it before inflating", len(bomb))
	}
}

// TestVerifyBombWithinLength checks the decompression cap itself: a sig short
// enough to pass the length check that inflates past MaxDecodedSize.
func TestVerifyBombWithinLength(t *testing.T) {
	bomb := encode(bytes.Repeat([]byte{' '}, 1<<20))
	if len(bomb) > MaxEncodedSize {
		t.Fatalf("test bomb too large: %d", len(bomb))
	}
	_, err := Verify(bomb, key, 1, "a", t0)
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "decompresses") {
		t.Fatalf("err = %v, want decompression cap", err)
	}
}

// TestSignFormat checks the document layout against the TLSSigAPIv2 format:
// numbers as numbers and the documented field names.
func TestSignFormat(t *testing.T) {
	sig := Sign(key, 1400000000, "administrator", t0, time.Hour)
	if strings.ContainsAny(sig, "+/=") {
		t.Fatalf("sig %q has characters the URL-safe variant replaces", sig)
	}
	c, _ := base64.StdEncoding.DecodeString(urlDecoding.Replace(sig))
	zr, err := zlib.NewReader(bytes.NewReader(c))
	if err != nil {
		t.Fatal(err)
	}
	var raw bytes.Buffer
	raw.ReadFrom(zr)
	for _, want := range []string{`"TLS.ver":"2.0"`, `"TLS.identifier":"administrator"`, `"TLS.sdkappid":1400000000`, `"TLS.expire":3600`, `"TLS.time":1700000000`, `"TLS.sig":"`} {
		if !strings.Contains(raw.String(), want) {
			t.Errorf("document %s lacks %s", raw.String(), want)
		}
	}
	// The HMAC input is the documented newline-terminated content.
	if got := mac(key, "administrator", 1400000000, 1700000000, 3600); !strings.Contains(raw.String(), got) {
		t.Errorf("document does not carry HMAC %s", got)
	}
}

func TestSignerRenews(t *testing.T) {
	now := t0
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := NewSigner(key, 7, "admin", 4*time.Hour, clock)
	first := s.Sig()
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			if got := s.Sig(); got != first {
				t.Errorf("sig changed without time passing")
			}
		})
	}
	wg.Wait()
	mu.Lock()
	now = t0.Add(3*time.Hour - time.Second)
	mu.Unlock()
	if s.Sig() != first {
		t.Fatal("renewed too early")
	}
	mu.Lock()
	now = t0.Add(3 * time.Hour)
	mu.Unlock()
	second := s.Sig()
	if second == first {
		t.Fatal("not renewed with a quarter of the lifetime left")
	}
	if _, err := Verify(second, key, 7, "admin", now.Add(4*time.Hour-time.Second)); err != nil {
		t.Fatalf("renewed sig: %v", err)
	}
}

func FuzzVerify(f *testing.F) {
	f.Add(Sign(key, 1, "a", t0, time.Hour))
	f.Add("")
	f.Add("eJyrVg==")
	f.Fuzz(func(t *testing.T, sig string) {
		c, err := Verify(sig, key, 1, "a", t0)
		if err == nil && (c.SDKAppID != 1 || c.Identifier != "a") {
			t.Fatalf("accepted foreign claims %+v", c)
		}
		if err != nil && Code(err) == 0 {
			t.Fatalf("error %v has no code", err)
		}
	})
}

func BenchmarkVerify(b *testing.B) {
	sig := Sign(key, 1400000000, "administrator", t0, 24*time.Hour)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Verify(sig, key, 1400000000, "administrator", t0); err != nil {
			b.Fatal(err)
		}
	}
}
