package im

import (
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// MarshalJSON writes the response in the seed's layout: a success answer
// (UserProfileItem non-nil) carries Fail_Account and Invalid_Account as
// arrays, empty or not; an error envelope carries only the status fields.
func (r *GetResponse) MarshalJSON() ([]byte, error) {
	return r.AppendJSON(make([]byte, 0, 256)), nil
}

// AppendJSON appends the JSON encoding of r to b, as MarshalJSON does,
// without reflection. It is the hot path of every proxy answer.
func (r *GetResponse) AppendJSON(b []byte) []byte {
	b = append(b, '{')
	if r.UserProfileItem != nil {
		b = append(b, `"UserProfileItem":[`...)
		for i := range r.UserProfileItem {
			if i > 0 {
				b = append(b, ',')
			}
			b = r.UserProfileItem[i].AppendJSON(b)
		}
		b = append(b, `],"Fail_Account":`...)
		b = appendStrings(b, r.FailAccount)
		b = append(b, `,"Invalid_Account":`...)
		b = appendStrings(b, r.InvalidAccount)
		b = append(b, ',')
	} else {
		if r.FailAccount != nil {
			b = append(b, `"Fail_Account":`...)
			b = appendStrings(b, r.FailAccount)
			b = append(b, ',')
		}
		if r.InvalidAccount != nil {
			b = append(b, `"Invalid_Account":`...)
			b = appendStrings(b, r.InvalidAccount)
			b = append(b, ',')
		}
	}
	b = append(b, `"ActionStatus":`...)
	b = AppendString(b, r.ActionStatus)
	b = append(b, `,"ErrorCode":`...)
	b = strconv.AppendInt(b, int64(r.ErrorCode), 10)
	b = append(b, `,"ErrorInfo":`...)
	b = AppendString(b, r.ErrorInfo)
	b = append(b, `,"ErrorDisplay":`...)
	b = AppendString(b, r.ErrorDisplay)
	return append(b, '}')
}

// AppendJSON appends the JSON encoding of u to b, as it appears in a
// GetResponse.
func (u *UserProfile) AppendJSON(b []byte) []byte {
	b = append(b, `{"To_Account":`...)
	b = AppendString(b, u.ToAccount)
	b = append(b, `,"ProfileItem":[`...)
	for i, it := range u.ProfileItem {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"Tag":`...)
		b = AppendString(b, it.Tag)
		b = append(b, `,"Value":`...)
		if len(it.Value) == 0 {
			b = append(b, `""`...)
		} else {
			b = append(b, it.Value...)
		}
		b = append(b, '}')
	}
	b = append(b, `],"ResultCode":`...)
	b = strconv.AppendInt(b, int64(u.ResultCode), 10)
	b = append(b, `,"ResultInfo":`...)
	b = AppendString(b, u.ResultInfo)
	return append(b, '}')
}

func appendStrings(b []byte, ss []string) []byte {
	b = append(b, '[')
	for i, s := range ss {
		if i > 0 {
			b = append(b, ',')
		}
		b = AppendString(b, s)
	}
	return append(b, ']')
}

// AppendString appends s as a JSON string, escaped as encoding/json does
// (HTML characters included), so any bytes an account id holds are safe.
func AppendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' || c >= utf8.RuneSelf {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
