package batcher

import "github.com/portrait-proxy/portrait-proxy/limiter"

// The limiters' optional parts are found by type assertion at run time; a
// changed signature would switch a feature off without a word. These fail
// the build instead.
var (
	_ throttler = (*limiter.Local)(nil)
	_ factorer  = (*limiter.Local)(nil)
	_ pauser    = (*limiter.Local)(nil)
	_ throttler = (*limiter.Shared)(nil)
	_ factorer  = (*limiter.Shared)(nil)
	_ pauser    = (*limiter.Shared)(nil)
)
