package capacity

import "math"

// exactTerms is how many terms of a generalized harmonic number are summed
// one by one; the rest is the midpoint-rule integral, whose error at this
// point is below 1e-12 of the sum.
const exactTerms = 100_000

// Harmonic returns the generalized harmonic number H(n, s) = Σ_{k=1..n}
// k^-s, the normalizer of a Zipf law over n ranks. It is exact to about
// 1e-12 relative for any n (the tail past exactTerms is integrated).
func Harmonic(n int, s float64) float64 {
	return partial(1, n, s)
}

// partial returns Σ_{k=a..b} k^-s (0 when b < a).
func partial(a, b int, s float64) float64 {
	if b < a {
		return 0
	}
	sum := 0.0
	k := a
	for ; k <= b && k < a+exactTerms; k++ {
		sum += math.Pow(float64(k), -s)
	}
	if k <= b {
		sum += integral(float64(k)-0.5, float64(b)+0.5, s)
	}
	return sum
}

// integral is ∫_x^y t^-s dt.
func integral(x, y, s float64) float64 {
	if math.Abs(s-1) < 1e-12 {
		return math.Log(y / x)
	}
	return (math.Pow(y, 1-s) - math.Pow(x, 1-s)) / (1 - s)
}

// Zipf is a Zipf law over ranks 1..N: rank k is asked for with probability
// k^-S / H(N, S).
type Zipf struct {
	N    int
	S    float64
	norm float64
}

// NewZipf returns the law over n ranks with skew s (s ≥ 0; 0 is uniform).
func NewZipf(n int, s float64) Zipf { return Zipf{N: n, S: s, norm: Harmonic(n, s)} }

// P returns the probability of rank k.
func (z Zipf) P(k int) float64 { return math.Pow(float64(k), -z.S) / z.norm }

// Mass returns the probability of ranks a..b together.
func (z Zipf) Mass(a, b int) float64 { return partial(max(a, 1), min(b, z.N), z.S) / z.norm }
