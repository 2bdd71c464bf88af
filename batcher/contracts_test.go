package batcher

import "github.com/portrait-proxy/portrait-proxy/limiter"

// Both limiters are what the batcher needs; a changed signature fails the
// build here rather than where the proxy wires them.
var (
	_ Limiter = (*limiter.Local)(nil)
	_ Limiter = (*limiter.Shared)(nil)
)
