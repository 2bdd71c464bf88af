package redistier

import (
	"testing"

	"go.uber.org/goleak"
)

// go-redis redials a failed pool in a goroutine that notices Close within
// a second (it sleeps between attempts); it is the library's, bounded, and
// not a leak of ours.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"))
}
