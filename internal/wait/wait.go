// Package wait is the tests' one way to wait for something another
// goroutine or process does: poll a condition with a short backoff and fail
// the test, naming what did not happen, when it does not happen in time.
//
// Tests whose code runs on the standard clock and does no real I/O use a
// testing/synctest bubble instead; For is for what a bubble cannot hold
// (loopback HTTP, redis-server processes, goroutines started elsewhere).
package wait

import (
	"testing"
	"time"
)

// maxStep caps the backoff between polls: short enough that a test waits
// little past the moment the condition holds.
const maxStep = 20 * time.Millisecond

// For polls cond until it returns true, starting at a millisecond between
// polls and doubling up to 20 ms, and fails the test with what if it is
// still false after timeout. cond runs on the calling goroutine, which
// must be the test's (For stops the test with t.Fatalf).
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for step := time.Millisecond; !cond(); step = min(2*step, maxStep) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
			return
		}
		time.Sleep(step)
	}
}
