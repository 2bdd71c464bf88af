package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/usersig"
)

// fastBuf is a connection buffer as the front hands it to ServeFast: the
// query and the body alias it, and the front reuses it for the next
// request on the connection.
type fastBuf struct {
	b          []byte
	qLen, bLen int
}

func (f *fastBuf) set(query, body string) {
	f.b = append(append(f.b[:0], query...), body...)
	f.qLen, f.bLen = len(query), len(body)
}

func (f *fastBuf) serve(h *Handler) im.GetResponse {
	q := unsafe.String(unsafe.SliceData(f.b), f.qLen)
	out := h.ServeFast(context.Background(), q, f.b[f.qLen:f.qLen+f.bLen], nil)
	var r im.GetResponse
	if err := json.Unmarshal(out, &r); err != nil {
		panic(err)
	}
	return r
}

// forge changes one character of sig (a valid base64 one, keeping its
// length), so it no longer verifies.
func forge(sig string) string {
	i := len(sig) / 2
	c := byte('A')
	if sig[i] == 'A' {
		c = 'B'
	}
	return sig[:i] + string(c) + sig[i+1:]
}

// ServeFast keeps nothing of the buffer it is given: after a good UserSig
// is remembered, the same bytes scribbled with a forged sig of the same
// length (at the same place, as the next request on a connection lands)
// are refused. A sig cache key aliasing the buffer would accept it.
func TestServeFastKeepsNoBufferBytes(t *testing.T) {
	l := &fakeLookup{}
	h := newHandler(t, l, AuthUserSig)
	sig := usersig.Sign(key, app, "administrator", time.Now(), time.Hour)
	bad := forge(sig)
	if _, err := usersig.Verify(bad, key, app, "administrator", time.Now()); err == nil {
		t.Fatal("the forged sig verifies")
	}
	q := func(sig string) string {
		return "sdkappid=1400000000&identifier=administrator&usersig=" + sig + "&random=1&contenttype=json"
	}
	for _, esc := range []bool{false, true} {
		sig, bad := sig, bad
		if esc { // the escaped spelling takes the sigBytes path
			sig, bad = fmt.Sprintf("%%%02X", sig[0])+sig[1:], fmt.Sprintf("%%%02X", bad[0])+bad[1:]
		}
		body := `{"To_Account":["alice"],"TagList":["Tag_Profile_Custom_Aa"]}`
		var f fastBuf
		f.set(q(sig), body)
		r := f.serve(h)
		if r.ErrorCode != 0 {
			t.Fatalf("good sig refused: %+v", r)
		}
		// Scribble: a forged sig and other account and tag, same lengths.
		f.set(q(bad), `{"To_Account":["mally"],"TagList":["Tag_Profile_Custom_Bb"]}`)
		if r := f.serve(h); r.ErrorCode == 0 {
			t.Fatalf("forged sig accepted after the buffer was reused (escaped %v)", esc)
		}
		// What the lookup was given is unchanged by the scribble.
		l.mu.Lock()
		last := l.calls[len(l.calls)-1]
		l.mu.Unlock()
		if len(last) != 1 || last[0] != "alice" {
			t.Fatalf("the lookup's accounts changed with the buffer: %q", last)
		}
		// The tag list remembered for the first text is not the second's,
		// even once another list (from another buffer) rebuilds the map.
		var g fastBuf
		g.set(q(sig), `{"To_Account":["alice"],"TagList":["Tag_Profile_Custom_Cc"]}`)
		g.serve(h)
		f.set(q(sig), `{"To_Account":["alice"],"TagList":["Tag_Profile_Custom_Bb"]}`)
		r = f.serve(h)
		if r.ErrorCode != 0 || len(r.UserProfileItem) != 1 || len(r.UserProfileItem[0].ProfileItem) != 1 ||
			r.UserProfileItem[0].ProfileItem[0].Tag != "Tag_Profile_Custom_Bb" {
			t.Fatalf("tags after reuse: %+v", r)
		}
	}
}

// ServeFast holds a body to the handler's own MaxBodyBytes, as
// ServeHTTP does: the front's limit is its own setting, and a handler
// configured lower must still refuse what it refuses over net/http.
func TestServeFastBodyLimit(t *testing.T) {
	h, err := New(Config{Lookup: &fakeLookup{}, SDKAppID: app, Key: key, MaxBodyBytes: 100})
	if err != nil {
		t.Fatal(err)
	}
	body := `{"To_Account":["alice"],"TagList":["Tag_Profile_IM_Nick"]}` + strings.Repeat(" ", 50)
	_, want, _ := do(t, h, "POST", query(), body)
	var f fastBuf
	f.set(query().Encode(), body)
	if got := f.serve(h); got.ErrorCode != want.ErrorCode || got.ErrorInfo != want.ErrorInfo || want.ErrorCode == 0 {
		t.Fatalf("ServeFast %d %q, ServeHTTP %d %q", got.ErrorCode, got.ErrorInfo, want.ErrorCode, want.ErrorInfo)
	}
}
