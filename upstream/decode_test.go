package upstream

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/im"
)

// sameAsJSON fails unless decodeGet gives in exactly what encoding/json
// gives: the same value and the same error. It reports whether the direct
// reader took in (no fallback).
func sameAsJSON(t *testing.T, in []byte) bool {
	t.Helper()
	var want, got im.GetResponse
	errWant := json.Unmarshal(in, &want)
	errGot := decodeGet(in, &got)
	if fmt.Sprint(errWant) != fmt.Sprint(errGot) {
		t.Fatalf("%q: error %v, encoding/json's %v", in, errGot, errWant)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%q:\n got %#v\nwant %#v", in, got, want)
	}
	p := reader{b: in}
	var r im.GetResponse
	return p.response(&r)
}

func randomAnswer(rng *rand.Rand) im.GetResponse {
	values := []string{`"nick"`, `""`, `0`, `-12`, `18446744073709551615`, `1.5e-3`, `true`, `false`, `"a\"b\\c\u00e9\n"`,
		`"héllo 世界"`, `{"k":[1,{"x":null}],"e":{}}`, `[]`, `"\ud83d\ude00"`, `"/\/\b\f\r\t"`}
	r := im.GetResponse{ActionStatus: "OK", ErrorInfo: "", ErrorCode: 0}
	for i := range rng.IntN(5) {
		u := im.UserProfile{ToAccount: fmt.Sprintf("user_%d.x-@%d", i, rng.IntN(1000)), ProfileItem: []im.ProfileItem{}}
		switch rng.IntN(4) {
		case 0:
			u.ResultCode, u.ResultInfo = 40003, "Account does not exist"
		default:
			for j := range rng.IntN(4) {
				u.ProfileItem = append(u.ProfileItem, im.ProfileItem{Tag: fmt.Sprintf("Tag_Profile_IM_%d", j),
					Value: json.RawMessage(values[rng.IntN(len(values))])})
			}
		}
		r.UserProfileItem = append(r.UserProfileItem, u)
	}
	if rng.IntN(3) == 0 {
		r.FailAccount = []string{"f1"}
	}
	if rng.IntN(4) == 0 {
		r.ActionStatus, r.ErrorCode, r.ErrorInfo = "FAIL", 70169+rng.IntN(10), "some failure"
	}
	return r
}

// TestDecodeGetAsJSON checks decodeGet against encoding/json on answers
// as the upstream sends them (which the direct reader must take), on
// hand-made edge cases and on many corrupted answers.
func TestDecodeGetAsJSON(t *testing.T) {
	for _, in := range []string{
		`{}`, ` { } `, `null`, `[]`, `""`, `{"ErrorCode":0}x`, `{"ErrorCode":1.0}`, `{"ErrorCode":1e2}`,
		`{"ErrorCode":-0}`, `{"ErrorCode":01}`, `{"ErrorCode":99999999999999999999}`, `{"ErrorCode":"1"}`,
		`{"errorcode":3}`, `{"ErrorCode":1,"ErrorCode":2}`, `{"Unknown":1,"ErrorCode":2}`, `{"ErrorInfo":"a\"b"}`,
		`{"ErrorInfo":"é"}`, `{"ErrorInfo":null}`, `{"UserProfileItem":null}`, `{"UserProfileItem":[]}`,
		`{"UserProfileItem":[{}]}`, `{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":null}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value": [1, 2 ,{"a" : "b"}] }]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":"\x01"}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":"\q"}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":"\u12"}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":-}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":1.}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":tru}]}]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":{"a":1,"a":2}}]}]}`,
		`{"UserProfileItem":[{"To_Account":"a","To_Account":"b"}]}`, `{"Fail_Account":[]}`, `{"Fail_Account":["a",1]}`,
		`{"UserProfileItem":[{"ProfileItem":[{"Tag":"t","Value":1}],}]}`, `{"ActionStatus":"OK",}`, "{\"ActionStatus\":\"O\x7fK\"}",
	} {
		sameAsJSON(t, []byte(in))
	}
	rng := rand.New(rand.NewPCG(1, 2))
	noise := []byte(`{}[],:"\\ u0e1-.+nlx` + "\x00\xff")
	for i := range 3000 {
		a := randomAnswer(rng)
		var in []byte
		if i%2 == 0 {
			in, _ = json.Marshal(a)
		} else {
			in, _ = json.MarshalIndent(a, " ", "\t")
		}
		if !sameAsJSON(t, in) {
			t.Fatalf("the direct reader left an answer as the upstream sends it to encoding/json: %s", in)
		}
		for range 5 {
			m := append([]byte(nil), in...)
			for range 1 + rng.IntN(3) {
				k := rng.IntN(len(m))
				switch rng.IntN(3) {
				case 0:
					m = append(m[:k], m[k+1:]...)
				case 1:
					m = append(m[:k], append([]byte{noise[rng.IntN(len(noise))]}, m[k:]...)...)
				default:
					m[k] = noise[rng.IntN(len(noise))]
				}
			}
			sameAsJSON(t, m)
		}
	}
}

// BenchmarkDecodeGet decodes the answer of a 100-account call of one tag.
func BenchmarkDecodeGet(b *testing.B) {
	r := im.GetResponse{ActionStatus: "OK"}
	for i := range 100 {
		r.UserProfileItem = append(r.UserProfileItem, im.UserProfile{ToAccount: fmt.Sprintf("user%06d", i),
			ProfileItem: []im.ProfileItem{{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(fmt.Sprintf(`"nick of user%06d"`, i))}}})
	}
	raw, _ := json.Marshal(r)
	for _, bc := range []struct {
		name   string
		decode func([]byte, *im.GetResponse) error
	}{
		{"direct", decodeGet},
		{"encoding-json", func(raw []byte, out *im.GetResponse) error { return json.Unmarshal(raw, out) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var out im.GetResponse
				if err := bc.decode(raw, &out); err != nil || len(out.UserProfileItem) != 100 {
					b.Fatal(err)
				}
			}
		})
	}
}
