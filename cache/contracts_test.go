package cache

import "github.com/portrait-proxy/portrait-proxy/batcher"

// The optional parts of Remote and Loader are found by type assertion at run
// time; a changed signature would switch a feature off without a word (it
// happened once: Feed.Change gained a parameter and the capacity simulator's
// tier stopped following the feed). These fail the build instead (the Redis
// tier's checks are in cache/redistier).
var (
	_ reserver = (*batcher.Batcher)(nil)
	_ admitter = (*batcher.Batcher)(nil)
	_ promoter = (*batcher.Batcher)(nil)
)
