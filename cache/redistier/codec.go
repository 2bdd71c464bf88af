package redistier

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"strings"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/portrait-proxy/portrait-proxy/im"
)

// b64 encodes account ids that cannot be part of a key as they are.
var b64 = base64.RawURLEncoding

// Field names: one byte for each standard tag, '~' + the suffix for custom
// tags, the full name for anything else; negField holds "no such account".
const negField = "!"

var standardField = func() map[string]string {
	m := map[string]string{}
	for i, t := range im.StandardTags {
		m[t] = string(rune('a' + i))
	}
	return m
}()

// fieldsOf are the fields a read of tags asks for: theirs, their classes'
// markers', and the negative entry's.
func fieldsOf(tags []string) []string {
	tags = cache.ReadTags(tags)
	fields := make([]string, 0, len(tags)+1)
	for _, t := range tags {
		fields = append(fields, fieldOf(t))
	}
	return append(fields, negField)
}

func fieldOf(tag string) string {
	if f, ok := standardField[tag]; ok {
		return f
	}
	if suffix, ok := strings.CutPrefix(tag, "Tag_Profile_Custom_"); ok {
		return "~" + suffix
	}
	return tag
}

// A tag field is: flags (bit 0: set; bits 1-2: Origin), Ver and Event as
// 6-byte big-endian Unix milliseconds (fixed width, so the write script
// reads them without parsing), fresh and stale deadlines as uvarint Unix
// milliseconds, then the value's JSON bytes exactly as the upstream sent
// them. A negative entry is Ver (6 bytes), the code and deadline as
// uvarints, then the message. write.lua reads the same layout; its test
// checks its copy of these numbers.
const (
	originShift = 1  // flags: Origin << originShift | set
	fieldVer    = 1  // a field's Ver is at this byte
	fieldEvent  = 7  // its Event
	fieldHead   = 13 // the deadlines start here
	verLen      = 6  // Ver's and Event's width
	negVer      = 0  // a negative entry's Ver is at this byte
)

func appendBE48(b []byte, v int64) []byte {
	u := uint64(max(v, 0))
	return append(b, byte(u>>40), byte(u>>32), byte(u>>24), byte(u>>16), byte(u>>8), byte(u))
}

func be48(b []byte) int64 {
	return int64(b[0])<<40 | int64(b[1])<<32 | int64(b[2])<<24 | int64(b[3])<<16 | int64(b[4])<<8 | int64(b[5])
}

func encodeTag(b []byte, v cache.TagValue) []byte {
	flags := byte(v.Origin) << originShift
	if v.Set {
		flags |= 1
	}
	b = append(b, flags)
	b = appendBE48(b, v.Ver)
	b = appendBE48(b, v.Event)
	b = binary.AppendUvarint(b, uint64(v.Fresh.UnixMilli()))
	b = binary.AppendUvarint(b, uint64(v.Stale.UnixMilli()))
	return append(b, v.Value...)
}

func decodeTag(s string) (cache.TagValue, bool) {
	b := []byte(s)
	if len(b) < fieldHead+2 || b[0] > 7 || b[0]>>originShift > byte(cache.FromInvalidate) {
		return cache.TagValue{}, false
	}
	v := cache.TagValue{Set: b[0]&1 == 1, Origin: cache.Origin(b[0] >> originShift), Ver: be48(b[fieldVer:]), Event: be48(b[fieldEvent:])}
	b = b[fieldHead:]
	fresh, n := binary.Uvarint(b)
	if n <= 0 {
		return cache.TagValue{}, false
	}
	stale, m := binary.Uvarint(b[n:])
	if m <= 0 {
		return cache.TagValue{}, false
	}
	v.Fresh, v.Stale = time.UnixMilli(int64(fresh)), time.UnixMilli(int64(stale))
	if rest := b[n+m:]; len(rest) > 0 {
		if !json.Valid(rest) {
			return cache.TagValue{}, false
		}
		v.Value = json.RawMessage(rest)
	}
	return v, true
}

func encodeNeg(b []byte, r *cache.Record) []byte {
	b = appendBE48(b, r.NotFoundVer)
	b = binary.AppendUvarint(b, uint64(r.NotFoundCode))
	b = binary.AppendUvarint(b, uint64(r.NotFoundUntil.UnixMilli()))
	return append(b, r.NotFoundInfo...)
}

func decodeNeg(s string, rec *cache.Record) bool {
	b := []byte(s)
	if len(b) < negVer+verLen {
		return false
	}
	ver := be48(b[negVer:])
	b = b[negVer+verLen:]
	code, n := binary.Uvarint(b)
	if n <= 0 || code == 0 {
		return false
	}
	until, m := binary.Uvarint(b[n:])
	if m <= 0 {
		return false
	}
	rec.NotFoundCode, rec.NotFoundUntil, rec.NotFoundInfo, rec.NotFoundVer = int(code), time.UnixMilli(int64(until)), string(b[n+m:]), ver
	return true
}

// decodeRecord builds a record from HMGET's answer for tags + negField;
// nil when nothing usable came back. Entries that do not decode are
// ignored (treated as misses), never served.
func decodeRecord(tags []string, vals []any) *cache.Record {
	tags = cache.ReadTags(tags)
	var rec *cache.Record
	for i, t := range tags {
		s, ok := vals[i].(string)
		if !ok {
			continue
		}
		v, ok := decodeTag(s)
		if !ok {
			continue
		}
		if rec == nil {
			rec = &cache.Record{Tags: make([]cache.TagValue, 0, len(tags))}
		}
		v.Tag = t
		rec.Put(v)
	}
	if s, ok := vals[len(tags)].(string); ok {
		var neg cache.Record
		if decodeNeg(s, &neg) {
			if rec == nil {
				rec = &cache.Record{}
			}
			rec.NotFoundCode, rec.NotFoundUntil, rec.NotFoundInfo, rec.NotFoundVer = neg.NotFoundCode, neg.NotFoundUntil, neg.NotFoundInfo, neg.NotFoundVer
		}
	}
	return rec
}
