package cache

import "time"

// Defaults of Config and NewLocal, exported for the flags that show them.
const (
	DefaultTTL           = 60 * time.Second // Config.TTL
	DefaultStaleTTL      = time.Hour        // Config.StaleTTL
	DefaultNegativeTTL   = 30 * time.Second // Config.NegativeTTL
	DefaultClockSkew     = time.Second      // Config.ClockSkew
	DefaultLocalAccounts = 1_000_000        // NewLocal's maxAccounts

	DefaultRefreshTimeout = 10 * time.Second // Config.RefreshTimeout
	DefaultRefreshBackoff = 5 * time.Second  // Config.RefreshBackoff
)

// KeyLifetime is how long a value learned now may still be served: fresh
// for ttl, then stale for staleTTL (zero or negative: the defaults, as in
// Config). A shared tier keeps an account's entry that long after its last
// write.
func KeyLifetime(ttl, staleTTL time.Duration) time.Duration {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if staleTTL <= 0 {
		staleTTL = DefaultStaleTTL
	}
	return ttl + staleTTL
}
