package redistier

import (
	"context"
	"encoding/binary"
	"errors"
	"time"

	"github.com/portrait-proxy/portrait-proxy/cache"
	"github.com/redis/go-redis/v9"
)

// Change writes rec (a change's tags) for account and publishes it on the
// app's change channel, in one round trip. With existing, only fields
// already in account's hash are written (see writeScript).
func (r *Tier) Change(ctx context.Context, account string, rec *cache.Record, existing bool) error {
	return r.ChangeAll(ctx, []string{account}, []*cache.Record{rec}, existing)
}

// ChangeAll is Change for several accounts (recs[i] for accounts[i]), all
// in one round trip.
func (r *Tier) ChangeAll(ctx context.Context, accounts []string, recs []*cache.Record, existing bool) error {
	if !r.up.Load() {
		return ErrDown
	}
	ctx, cancel := context.WithTimeout(ctx, 4*r.cfg.Timeout)
	defer cancel()
	now := time.Now()
	err := r.exec(ctx, func(pipe redis.Pipeliner, load bool) {
		mode := writeMerge
		if existing {
			mode = writeExisting
		}
		for i, account := range accounts {
			r.queueWrite(ctx, pipe, account, recs[i], mode, load)
			pipe.Publish(ctx, r.feed, encodeChange(r.cfg.Replica, now, account, recs[i]))
		}
	})
	if err != nil {
		if ctx.Err() == nil || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			r.down("change", err)
		}
		return err
	}
	return nil
}

// Follow subscribes to the app's change channel until ctx ends. A
// resubscription after a cut calls lost: what was published meanwhile is
// gone.
func (r *Tier) Follow(ctx context.Context, apply func(account string, rec *cache.Record, sent time.Time), lost func()) {
	ps := r.cfg.Client.Subscribe(ctx, r.feed)
	stop := context.AfterFunc(ctx, func() { ps.Close() })
	defer stop()
	defer ps.Close()
	subscribed := false
	for {
		msg, err := ps.Receive(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.m.RedisErrors.WithLabelValues("feed").Inc()
			select { // the next Receive reconnects; do not spin while Redis is away
			case <-ctx.Done():
				return
			case <-time.After(r.cfg.ProbeEvery):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				if subscribed {
					lost()
				}
				subscribed = true
			}
		case *redis.Message:
			replica, sent, account, rec, ok := decodeChange(m.Payload)
			if !ok {
				r.m.RedisErrors.WithLabelValues("feed").Inc()
				continue
			}
			if replica != r.cfg.Replica {
				apply(account, rec, sent)
			}
		}
	}
}

// A change message: version byte 1, the length-prefixed replica, the send
// time in Unix microseconds (uvarint), then length-prefixed account and
// (tag, encoded field) pairs; a negative entry (an account_delete) is the
// pair (negField, its encoded form).
func encodeChange(replica string, sent time.Time, account string, rec *cache.Record) string {
	b := []byte{1}
	b = appendLP(b, replica)
	b = binary.AppendUvarint(b, uint64(sent.UnixMicro()))
	b = appendLP(b, account)
	var field []byte
	for _, v := range rec.Tags {
		b = appendLP(b, v.Tag)
		field = encodeTag(field[:0], v)
		b = appendLP(b, string(field))
	}
	if rec.NotFoundCode != 0 {
		b = appendLP(b, negField)
		b = appendLP(b, string(encodeNeg(nil, rec)))
	}
	return string(b)
}

func appendLP(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func decodeChange(s string) (replica string, sent time.Time, account string, rec *cache.Record, ok bool) {
	if len(s) == 0 || s[0] != 1 {
		return
	}
	s = s[1:]
	next := func() (string, bool) {
		n, k := binary.Uvarint([]byte(s[:min(len(s), binary.MaxVarintLen64)]))
		if k <= 0 || uint64(len(s)-k) < n {
			return "", false
		}
		v := s[k : k+int(n)]
		s = s[k+int(n):]
		return v, true
	}
	if replica, ok = next(); !ok {
		return
	}
	us, k := binary.Uvarint([]byte(s[:min(len(s), binary.MaxVarintLen64)]))
	if k <= 0 {
		return "", time.Time{}, "", nil, false
	}
	s = s[k:]
	sent = time.UnixMicro(int64(us))
	if account, ok = next(); !ok {
		return
	}
	rec = &cache.Record{}
	for len(s) > 0 {
		tag, ok1 := next()
		field, ok2 := next()
		if !ok1 || !ok2 {
			return "", time.Time{}, "", nil, false
		}
		if tag == negField {
			if !decodeNeg(field, rec) {
				return "", time.Time{}, "", nil, false
			}
			continue
		}
		v, ok3 := decodeTag(field)
		if !ok3 {
			return "", time.Time{}, "", nil, false
		}
		v.Tag = tag
		rec.Put(v)
	}
	return replica, sent, account, rec, true
}
