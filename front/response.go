package front

import (
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// appendResponse appends a 200 answer with body as JSON: the status line
// and headers net/http writes for the same answer (Content-Type,
// Content-Length, Date), and Connection: close when the connection ends
// after it.
func appendResponse(out, body []byte, now time.Time, close bool) []byte {
	out = append(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: "...)
	out = appendDate(out, now)
	out = append(out, "\r\nContent-Length: "...)
	out = strconv.AppendInt(out, int64(len(body)), 10)
	if close {
		out = append(out, "\r\nConnection: close"...)
	}
	out = append(out, "\r\n\r\n"...)
	return append(out, body...)
}

// date is a Date header's value for one second.
type date struct {
	unix int64
	text []byte
}

var lastDate atomic.Pointer[date]

// appendDate appends now as an HTTP date, formatted once a second.
func appendDate(b []byte, now time.Time) []byte {
	sec := now.Unix()
	if d := lastDate.Load(); d != nil && d.unix == sec {
		return append(b, d.text...)
	}
	d := &date{unix: sec, text: now.UTC().AppendFormat(nil, http.TimeFormat)}
	lastDate.Store(d)
	return append(b, d.text...)
}
