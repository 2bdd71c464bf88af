package cache

import (
	"context"
	"time"

	"github.com/portrait-proxy/portrait-proxy/im"
	"github.com/portrait-proxy/portrait-proxy/metrics"
)

// importTags are the tags an account_import may set (Nick, FaceUrl).
var importTags = []string{"Tag_Profile_IM_Nick", "Tag_Profile_IM_Image"}

// BatchFeed is the optional part of a Feed that changes several accounts
// in one round trip (the Redis tier of cache/redistier has it): Change for
// accounts[i] and recs[i], for every i.
type BatchFeed interface {
	ChangeAll(ctx context.Context, accounts []string, recs []*Record, existing bool) error
}

// Imported tells every tier and every replica that accounts exist as of
// at (an account_import or multiaccount_import the upstream answered OK):
// their "not found" entries are dropped, and so are the tags an import may
// set (nickname, face), so the next lookup asks the upstream. A fetch sent
// before at can no longer store "not found" for them (see supersedes).
// The error is the shared tier's: the change is then only here.
func (c *Cache) Imported(ctx context.Context, accounts []string, at time.Time) error {
	now := c.now()
	recs := make([]*Record, len(accounts))
	for i := range accounts {
		rec := &Record{Tags: make([]TagValue, 0, len(importTags))}
		for _, t := range importTags {
			rec.put(TagValue{Tag: intern(t), Origin: FromInvalidate, Ver: at.UnixMilli(), Fresh: now, Stale: now})
		}
		recs[i] = rec
	}
	return c.changeAll(ctx, accounts, recs, now)
}

// Deleted tells every tier and every replica that accounts no longer
// exist as of at (account_delete answered OK for them). With known true,
// their cached tags are replaced by "not found" for NegativeTTL; with
// known false (the outcome is unknown: no answer, or one that could not be
// read) the tags are only dropped, and the next lookup asks the upstream.
//
// A known deletion is versioned at+ClockSkew, so it wins over every value
// known as of at (a set or callback answered up to ClockSkew earlier
// included, as a fetch sent that late would), and a late answer to a
// fetch sent before the deletion cannot bring the account back. An
// unknown outcome is versioned at: fetches sent after it are cached again
// at once.
func (c *Cache) Deleted(ctx context.Context, accounts []string, at time.Time, known bool) error {
	now := c.now()
	until, ver := now, at.UnixMilli()
	if known {
		until, ver = now.Add(c.cfg.NegativeTTL), at.Add(c.cfg.ClockSkew).UnixMilli()
	}
	recs := make([]*Record, len(accounts))
	for i := range accounts {
		recs[i] = &Record{NotFoundCode: im.CodeAccountNotFound, NotFoundInfo: "account does not exist (deleted)",
			NotFoundUntil: until, NotFoundVer: ver}
	}
	return c.changeAll(ctx, accounts, recs, now)
}

// changeAll applies recs (one per account) to the in-process tier and,
// with the shared tier's feed, to Redis and every replica in one round
// trip.
func (c *Cache) changeAll(ctx context.Context, accounts []string, recs []*Record, now time.Time) error {
	if len(accounts) == 0 {
		return nil
	}
	f, ok := c.cfg.Remote.(BatchFeed)
	if !ok {
		var first error
		for i, a := range accounts {
			if err := c.change(ctx, a, recs[i], metrics.ChangeAccount, now, false); err != nil && first == nil {
				first = err
			}
		}
		return first
	}
	applied := 0
	for i, a := range accounts {
		if c.local.Merge(a, recs[i], now) || !c.local.Enabled() {
			applied++
		}
	}
	if err := f.ChangeAll(ctx, accounts, recs, false); err != nil {
		c.m.Changes.WithLabelValues(metrics.ChangeAccount, metrics.ChangeUnshared).Add(float64(len(accounts)))
		return err
	}
	c.m.Changes.WithLabelValues(metrics.ChangeAccount, metrics.ChangeApplied).Add(float64(applied))
	c.m.Changes.WithLabelValues(metrics.ChangeAccount, metrics.ChangeOld).Add(float64(len(accounts) - applied))
	return nil
}
