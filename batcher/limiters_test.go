package batcher

import "time"

// The rest of Limiter for the test limiters: no cut, no pause, and no rate
// (Admit estimates nothing) unless wrapped in rated.

func (g *gate) Factor() float64 { return 1 }
func (g *gate) Rate() float64   { return 0 }

func (open) Throttled(time.Duration) {}
func (open) Factor() float64         { return 1 }
func (open) Paused() time.Duration   { return 0 }
func (open) Rate() float64           { return 0 }

// rated is a test limiter with a quota of rate calls per second.
type rated struct {
	Limiter
	rate float64
}

func (r rated) Rate() float64 { return r.rate }
