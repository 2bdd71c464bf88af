package im

import (
	"encoding/json"
	"strings"
	"testing"
)

func sample() *GetResponse {
	r := &GetResponse{ActionStatus: StatusOK, FailAccount: []string{}, InvalidAccount: []string{}}
	r.UserProfileItem = []UserProfile{{ToAccount: "user1", ProfileItem: []ProfileItem{
		{Tag: "Tag_Profile_IM_Nick", Value: json.RawMessage(`"nick-user1"`)},
		{Tag: "Tag_Profile_IM_Level", Value: json.RawMessage(`18446744073709551615`)},
	}}}
	return r
}

// TestAppendJSONMatchesEncodingJSON: the hand encoder and encoding/json
// agree on every field (decoded both ways), and odd bytes are escaped.
func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	r := sample()
	r.UserProfileItem[0].ToAccount = "a\"b\\c<&>\x01é"
	r.ErrorInfo = "line\nbreak"
	raw := r.AppendJSON(nil)
	if !json.Valid(raw) {
		t.Fatalf("invalid JSON: %s", raw)
	}
	var back GetResponse
	if err := json.Unmarshal(raw, &back); err != nil {
		t.Fatal(err)
	}
	if back.UserProfileItem[0].ToAccount != r.UserProfileItem[0].ToAccount || back.ErrorInfo != r.ErrorInfo ||
		string(back.UserProfileItem[0].ProfileItem[1].Value) != "18446744073709551615" {
		t.Fatalf("round trip: %+v", back)
	}
	if !strings.Contains(string(raw), `"Fail_Account":[],"Invalid_Account":[]`) {
		t.Fatalf("success answer without the seed's arrays: %s", raw)
	}
	env := (&GetResponse{ActionStatus: StatusFail, ErrorCode: 40001, ErrorInfo: "x"}).AppendJSON(nil)
	if string(env) != `{"ActionStatus":"FAIL","ErrorCode":40001,"ErrorInfo":"x","ErrorDisplay":""}` {
		t.Fatalf("envelope %s", env)
	}
}

func BenchmarkAppendJSON(b *testing.B) {
	r := sample()
	buf := make([]byte, 0, 1024)
	b.ReportAllocs()
	for b.Loop() {
		buf = r.AppendJSON(buf[:0])
	}
}

func BenchmarkEncodingJSONBaseline(b *testing.B) {
	r := sample()
	type plain GetResponse // without the MarshalJSON method
	b.ReportAllocs()
	for b.Loop() {
		json.Marshal((*plain)(r))
	}
}
