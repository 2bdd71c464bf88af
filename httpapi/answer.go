package httpapi

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// bufPool holds the buffers answers are encoded into and bodies read into.
// A buffer goes back once the answer is written (Write copies it) or the
// body is decoded (the accounts and tags are copies).
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

const maxPooledBuf = 1 << 20

func getBuf() *[]byte { return bufPool.Get().(*[]byte) }

func putBuf(bp *[]byte, b []byte) {
	if cap(b) <= maxPooledBuf {
		*bp = b[:0]
		bufPool.Put(bp)
	}
}

// jsonType is the Content-Type header's value, shared by every answer:
// the server only reads header values.
var jsonType = []string{"application/json"}

// lengths holds shared Content-Length header values of small answers,
// made on first use.
var lengths [16 << 10]atomic.Pointer[[]string]

func contentLength(n int) []string {
	if n >= len(lengths) {
		return []string{strconv.Itoa(n)}
	}
	if v := lengths[n].Load(); v != nil {
		return *v
	}
	v := []string{strconv.Itoa(n)}
	lengths[n].Store(&v)
	return v
}

// writeJSON writes b as the answer, with the headers h.write sets.
func writeJSON(w http.ResponseWriter, status int, b []byte) {
	hd := w.Header()
	hd["Content-Type"] = jsonType
	hd["Content-Length"] = contentLength(len(b))
	w.WriteHeader(status)
	w.Write(b)
}

// readBodyInto is readBody reading into buf (which it may grow): the same
// limit, errors and envelopes.
func (h *Handler) readBodyInto(r *http.Request, buf []byte) ([]byte, *im.Envelope) {
	raw, err := readLimited(r.Body, h.cfg.MaxBodyBytes, buf)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			e := failEnvelope(im.CodeBadRequest, fmt.Sprintf("request body larger than %d bytes", h.cfg.MaxBodyBytes))
			return raw, &e
		}
		e := failEnvelope(im.CodeHTTPParse, "reading request body failed")
		return raw, &e
	}
	return raw, nil
}

// readLimited is io.ReadAll(http.MaxBytesReader(nil, r, limit)) appending
// to buf: a body longer than limit is a *http.MaxBytesError.
func readLimited(r io.Reader, limit int64, buf []byte) ([]byte, error) {
	b := buf[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		room := b[len(b):cap(b)]
		if left := limit - int64(len(b)) + 1; left > 0 && int64(len(room)) > left { // left ≤ 0: overflowed, no limit to cut at
			room = room[:left]
		}
		n, err := r.Read(room)
		b = b[:len(b)+n]
		if int64(len(b)) > limit {
			return b, &http.MaxBytesError{Limit: limit}
		}
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// lookupCounters are the children of lookups_total the answer counts, resolved once.
type lookupCounters struct {
	found, invalid, errored, notFound, failed prometheus.Counter
}

func newLookupCounters(m *metrics.Metrics) lookupCounters {
	return lookupCounters{
		found:    m.Lookups.WithLabelValues(metrics.LookupFound),
		invalid:  m.Lookups.WithLabelValues(metrics.LookupInvalid),
		errored:  m.Lookups.WithLabelValues(metrics.LookupError),
		notFound: m.Lookups.WithLabelValues(metrics.LookupNotFound),
		failed:   m.Lookups.WithLabelValues(metrics.LookupFailed),
	}
}

const invalidInfo = "invalid account id: 1-32 bytes of printable ASCII"

// appendAnswers appends the answer for accounts (answers holding one entry
// per valid account, in order) to b and returns its ErrorCode. It writes
// what assembling an im.GetResponse and encoding it did, byte for byte,
// without building one: in request order; when every account failed with
// the same error, the whole call fails with its code, as the upstream does
// for whole-call errors.
func (h *Handler) appendAnswers(b []byte, accounts []string, answers []cache.Answer) ([]byte, int) {
	errCount, firstCode, sameCode, firstInfo := 0, 0, true, ""
	k := 0
	for _, a := range accounts {
		if !validAccount(a) {
			h.lookups.invalid.Inc()
			continue
		}
		ans := &answers[k]
		k++
		switch {
		case ans.Err != nil:
			code, info := ErrorCode(ans.Err)
			if errCount == 0 {
				firstCode, firstInfo = code, info
			} else if code != firstCode {
				sameCode = false
			}
			errCount++
			h.lookups.errored.Inc()
		case ans.Item.ResultCode != 0:
			if im.Classify(ans.Item.ResultCode) == im.KindNotFound {
				h.lookups.notFound.Inc()
			} else {
				h.lookups.failed.Inc()
			}
		default:
			h.lookups.found.Inc()
		}
	}
	if errCount > 0 && errCount == len(accounts) && sameCode {
		return fail(firstCode, firstInfo).AppendJSON(b), firstCode
	}
	b = append(b, `{"UserProfileItem":[`...)
	k = 0
	for i, a := range accounts {
		if i > 0 {
			b = append(b, ',')
		}
		var item im.UserProfile
		switch {
		case !validAccount(a):
			item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}, ResultCode: im.CodeAccountNotFound, ResultInfo: invalidInfo}
		case answers[k].Err != nil:
			code, info := ErrorCode(answers[k].Err)
			item = im.UserProfile{ToAccount: a, ProfileItem: []im.ProfileItem{}, ResultCode: code, ResultInfo: info}
			k++
		default:
			b = answers[k].Item.AppendJSON(b)
			k++
			continue
		}
		b = item.AppendJSON(b)
	}
	b = append(b, `],"Fail_Account":[`...)
	b = appendAccounts(b, accounts, answers, true)
	b = append(b, `],"Invalid_Account":[`...)
	b = appendAccounts(b, accounts, answers, false)
	return append(b, `],"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","ErrorDisplay":""}`...), 0
}

// appendAccounts appends the failed accounts (failed) or the invalid ones
// as JSON array elements.
func appendAccounts(b []byte, accounts []string, answers []cache.Answer, failed bool) []byte {
	k, n := 0, 0
	for _, a := range accounts {
		var listed bool
		if !validAccount(a) {
			listed = !failed
		} else {
			listed = failed && (answers[k].Err != nil || answers[k].Item.ResultCode != 0)
			k++
		}
		if listed {
			if n > 0 {
				b = append(b, ',')
			}
			b = im.AppendString(b, a)
			n++
		}
	}
	return b
}
