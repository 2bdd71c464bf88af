package cache

// The optional parts of Remote are found by type assertion at run time; a
// changed signature would switch a feature off without a word (it happened
// once: Feed.Change gained a parameter and the capacity simulator's tier
// stopped following the feed). The Redis tier's checks, which fail the
// build instead, are in cache/redistier; the Loader is declared whole, so
// the compiler checks it where it is wired (proxy/loader.go).
