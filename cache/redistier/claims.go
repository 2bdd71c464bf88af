package redistier

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/portrait-proxy/portrait-proxy/cache"
)

// claimKey is the key of the "being fetched" marker of account.
func (r *Tier) claimKey(account string) string { return r.Key(account) + ":f" }

// ClaimTTL bounds how long a claim holds when its owner never writes back
// (it died): waiters fetch themselves after that.
const ClaimTTL = 3 * time.Second

// Claim sets account's marker if none is set (SET NX): owned means this
// replica fetches. In the same pipeline, after the SET, it reads the
// record: a replica that wrote its result and dropped its marker just
// before has its result there (record and marker share a slot, so the
// order holds on a cluster too). Claims from concurrent lookups are sent
// together, one pipeline for all that are waiting, by Run. While the tier
// is down every replica fetches.
func (r *Tier) Claim(ctx context.Context, account string, tags []string) (bool, *cache.Record, error) {
	if !r.up.Load() {
		return true, nil, nil
	}
	c := &claim{account: account, tags: tags, done: make(chan struct{})}
	select {
	case r.claims <- c:
	case <-ctx.Done():
		return true, nil, ctx.Err()
	}
	select {
	case <-c.done:
		return c.owned, c.rec, c.err
	case <-ctx.Done():
		return true, nil, ctx.Err()
	}
}

type claim struct {
	account string
	tags    []string
	owned   bool
	rec     *cache.Record
	err     error
	done    chan struct{}
}

// runClaims sends waiting claims in pipelines until ctx ends.
func (r *Tier) runClaims(ctx context.Context) {
	batch := make([]*claim, 0, 256)
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case c := <-r.claims:
					c.owned, c.err = true, ErrDown
					close(c.done)
				default:
					return
				}
			}
		case c := <-r.claims:
			batch = gather(append(batch[:0], c), r.claims, func(b []*claim) bool { return len(b) == cap(b) })
			r.sendClaims(batch)
		}
	}
}

func (r *Tier) sendClaims(batch []*claim) {
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
	defer cancel()
	pipe := r.cfg.Client.Pipeline()
	sets := make([]*redis.BoolCmd, len(batch))
	gets := make([]*redis.SliceCmd, len(batch))
	for i, c := range batch {
		sets[i] = pipe.SetNX(ctx, r.claimKey(c.account), 1, ClaimTTL)
		gets[i] = pipe.HMGet(ctx, r.Key(c.account), fieldsOf(c.tags)...)
	}
	r.m.RedisRoundTrips.Inc()
	cmds, err := pipe.Exec(ctx)
	if err != nil && (errors.Is(err, redis.Nil) || onlyKeyErrors(r.m, cmds)) {
		err = nil
	}
	if err != nil {
		r.down("claim", err)
	}
	for i, c := range batch {
		switch {
		case err != nil:
			c.owned, c.err = true, err
		case sets[i].Err() != nil || gets[i].Err() != nil:
			c.owned = true // a key of another type: fetch here, as if unclaimed
		default:
			c.owned, c.rec = sets[i].Val(), decodeRecord(c.tags, gets[i].Val())
		}
		close(c.done)
	}
}

// Release deletes account's marker (after a failed fetch), best effort.
func (r *Tier) Release(account string) {
	if !r.up.Load() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
	defer cancel()
	if err := r.cfg.Client.Del(ctx, r.claimKey(account)).Err(); err != nil {
		r.down("release", err)
	}
}

// Poll reads account's record for tags and whether its marker is set, in
// one round trip.
func (r *Tier) Poll(ctx context.Context, account string, tags []string) (*cache.Record, bool, error) {
	if !r.up.Load() {
		return nil, false, ErrDown
	}
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
	defer cancel()
	pipe := r.cfg.Client.Pipeline()
	get := pipe.HMGet(ctx, r.Key(account), fieldsOf(tags)...)
	exists := pipe.Exists(ctx, r.claimKey(account))
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, false, err
	}
	return decodeRecord(tags, get.Val()), exists.Val() == 1, nil
}
