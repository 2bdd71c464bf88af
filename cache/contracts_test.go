package cache

// The optional parts of Remote are found by type assertion at run
// time; a changed signature would switch a feature off without a word (it
// happened once: Feed.Change gained a parameter and the capacity simulator's
// tier stopped following the feed). These fail the build instead.
var (
	_ Feed        = (*Redis)(nil)
	_ Coordinator = (*Redis)(nil)
	_ allFeed     = (*Redis)(nil)
)
