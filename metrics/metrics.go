// Package metrics owns the names of the proxy's Prometheus metrics.
//
// New creates every family and registers it on the given Registerer; the
// other packages take the *Metrics and only observe. All names carry the
// prefix portrait_proxy_, use base units (seconds, accounts) and have no
// per-account labels. A nil *Metrics is not valid; tests that do not care
// pass New(prometheus.NewRegistry()).
package metrics

import "github.com/prometheus/client_golang/prometheus"

const namespace = "portrait_proxy"

// Metrics holds every metric family of the proxy.
type Metrics struct {
	Requests           *prometheus.CounterVec // requests_total{result}
	RequestDuration    prometheus.Histogram   // request_duration_seconds
	Lookups            *prometheus.CounterVec // lookups_total{result}: accounts answered
	CacheLookups       *prometheus.CounterVec // cache_lookups_total{tier,result}
	SingleflightShared prometheus.Counter     // singleflight_shared_total
	BatchAccounts      prometheus.Histogram   // batch_accounts
	BatchWait          prometheus.Histogram   // batch_wait_seconds
	LimiterWait        prometheus.Histogram   // limiter_wait_seconds
	UpstreamCalls      *prometheus.CounterVec // upstream_calls_total{result}
	UpstreamDuration   prometheus.Histogram   // upstream_call_duration_seconds
	UpstreamRetries    *prometheus.CounterVec // upstream_retries_total{reason}
	QueueAccounts      prometheus.Gauge       // queue_accounts
	LimiterFallback    prometheus.Gauge       // limiter_fallback
	RateFactor         prometheus.Gauge       // limiter_rate_factor
	Shed               prometheus.Counter     // shed_lookups_total
	RefreshShed        prometheus.Counter     // refresh_shed_total
	BuildInfo          *prometheus.GaugeVec   // build_info{version,goversion}
	Quota              prometheus.Gauge       // quota_calls_per_second
	CrossReplica       *prometheus.CounterVec // cross_replica_fetches_total{result}
	RedisUp            prometheus.Gauge       // redis_up
	RedisErrors        *prometheus.CounterVec // redis_errors_total{op}
	RedisDropped       prometheus.Counter     // redis_dropped_writes_total
	RedisRoundTrips    prometheus.Counter     // redis_round_trips_total
	SetRequests        *prometheus.CounterVec // set_requests_total{result}
	Callbacks          *prometheus.CounterVec // callbacks_total{result}
	Changes            *prometheus.CounterVec // profile_changes_total{source,result}
	FeedDelay          prometheus.Histogram   // change_feed_delay_seconds

	// Isolation of whole-call refusals caused by one caller.
	IsolationCalls  *prometheus.CounterVec // isolation_calls_total{cause}
	IsolationGaveUp prometheus.Counter     // isolation_unresolved_total
	RefusedTags     *prometheus.CounterVec // refused_tag_requests_total{source}
	LearnedTags     prometheus.Gauge       // learned_bad_tags
	// Forwarded calls and the API listener's TLS.
	Forwarded       *prometheus.CounterVec   // forwarded_requests_total{service,result}
	ForwardDuration *prometheus.HistogramVec // forwarded_request_duration_seconds{service}
	TLSReloads      *prometheus.CounterVec   // tls_certificate_reloads_total{result}
	TLSNotAfter     prometheus.Gauge         // tls_certificate_not_after_seconds
	// The API listener's front (package front).
	Handoffs *prometheus.CounterVec // http_handoffs_total{reason}
}

// ForwardServices are the IM services forwarded_requests_total names; any
// other service is counted as ServiceOther, so the label stays bounded
// whatever paths callers send.
var ForwardServices = []string{"im_open_login_svc", "openim", "group_open_http_svc", "sns", "profile", "all_member_push",
	"openconfigsvr", "open_msg_svc", "ConfigSvc", "recentcontact"}

// ServiceOther is the service label of every service not in ForwardServices.
const ServiceOther = "other"

// Results of forwarded_requests_total.
const (
	ForwardOK          = "ok"          // the upstream answered HTTP 2xx (the IM result is in the body, passed on)
	ForwardHTTP        = "http"        // the upstream answered another HTTP status (passed on)
	ForwardUnreachable = "unreachable" // no answer: connection refused, reset or closed (answered 200 + an IM error)
	ForwardTimeout     = "timeout"     // no answer within the timeout (answered 200 + 70169)
	ForwardRejected    = "rejected"    // refused by the proxy, never sent: not POST, bad path, body too large, bad sdkappid or UserSig
	ForwardCanceled    = "canceled"    // the caller left before the upstream answered
)

// ForwardService returns the service label of an IM service name.
func ForwardService(service string) string {
	for _, s := range ForwardServices {
		if s == service {
			return s
		}
	}
	return ServiceOther
}

// Causes of isolation_calls_total.
const (
	IsolateTag     = "tag"     // a whole call refused for a tag (40009, 40007, 40801): split by the callers' tag sets
	IsolateAccount = "account" // a whole call refused for an account (40003, 60015, 40001): split in halves
	IsolateClass   = "class"   // an account without data of one tag class (40807/40809): its other callers asked again
)

// Sources of refused_tag_requests_total.
const (
	RefusedLearned    = "learned"    // a tag the upstream refused before (this replica or another)
	RefusedConfigured = "configured" // a custom tag outside -custom-tags
)

// Sources of profile_changes_total.
const (
	ChangeSet      = "set"      // a portrait_set through this replica
	ChangeCallback = "callback" // a change callback received by this replica
	ChangeFeed     = "feed"     // announced by another replica
	ChangeAccount  = "account"  // an account imported or deleted through this replica (a forwarded call)
)

// Results of profile_changes_total.
const (
	ChangeApplied  = "applied"  // at least one tag was newer than what was cached
	ChangeOld      = "old"      // every tag was older than (or the same as) what was cached: ignored
	ChangeUnshared = "unshared" // applied here, but the shared tier or the feed failed: other replicas learn at TTL
)

// Result labels of lookups_total.
const (
	LookupFound    = "found"
	LookupFailed   = "failed" // a per-account upstream failure code
	LookupError    = "error"  // no answer could be had
	LookupStale    = "stale"  // served past its fresh TTL because upstream failed
	LookupInvalid  = "invalid"
	LookupNotFound = "not_found"
)

// latency are the buckets of the duration histograms, in seconds.
var latency = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// New creates the families and registers them on reg. It panics if a name
// is already registered there, as prometheus.MustRegister does. Every known
// label value starts at zero, so series exist (and rates work) before the
// first event.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{}
	m.newLookups(reg)
	m.newUpstream(reg)
	m.newRedis(reg)
	m.newChanges(reg)
	m.newIsolation(reg)
	m.newForward(reg)
	return m
}

// newLookups are the drop-in API's and the cache's figures.
func (m *Metrics) newLookups(reg prometheus.Registerer) {
	m.Requests = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "requests_total",
		Help: "portrait_get requests answered, by result (ok or the IM error code class)."}, []string{"result"})
	m.RequestDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "request_duration_seconds",
		Help: "Time from request received to answer written.", Buckets: latency})
	m.Lookups = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "lookups_total",
		Help: "Accounts answered, by result."}, []string{"result"})
	m.CacheLookups = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "cache_lookups_total",
		Help: "Account lookups in a cache tier, by tier and result (hit, stale, miss; error: the tier failed). A remembered no-such-account counts as a hit."}, []string{"tier", "result"})
	m.SingleflightShared = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "singleflight_shared_total",
		Help: "Lookups that joined a fetch already in flight for the same account and tags."})
	m.Shed = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "shed_lookups_total",
		Help: "Missed lookups answered at once (stale, or a throttling error) because the quota could not serve them before their deadline."})
	m.RefreshShed = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "refresh_shed_total",
		Help: "Background refreshes dropped from the batcher's queue, or not queued, to leave the queue to foreground misses."})
	m.CrossReplica = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "cross_replica_fetches_total",
		Help: "Misses coordinated across replicas: claimed (fetched here), waited (answered by another replica's fetch), taken_over (the other fetch failed)."}, []string{"result"})
	m.BuildInfo = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: "build_info",
		Help: "Always 1; labels say which build runs."}, []string{"version", "goversion"})
	for _, r := range []string{LookupFound, LookupFailed, LookupError, LookupStale, LookupInvalid, LookupNotFound} {
		m.Lookups.WithLabelValues(r)
	}
	for _, r := range []string{"hit", "stale", "miss"} {
		m.CacheLookups.WithLabelValues("local", r)
		m.CacheLookups.WithLabelValues("redis", r)
	}
	m.CacheLookups.WithLabelValues("redis", "error")
	for _, r := range []string{"claimed", "waited", "taken_over"} {
		m.CrossReplica.WithLabelValues(r)
	}
	m.Requests.WithLabelValues("ok")
	reg.MustRegister(m.Requests, m.RequestDuration, m.Lookups, m.CacheLookups, m.SingleflightShared, m.Shed, m.RefreshShed, m.CrossReplica, m.BuildInfo)
}

// newUpstream are the batcher's, the limiter's and the upstream calls' figures.
func (m *Metrics) newUpstream(reg prometheus.Registerer) {
	m.BatchAccounts = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "batch_accounts",
		Help: "Accounts per upstream call.", Buckets: []float64{1, 2, 5, 10, 20, 50, 80, 90, 95, 98, 99, 100}})
	m.BatchWait = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "batch_wait_seconds",
		Help: "Time from a batch's first account queued to the batch sent.", Buckets: latency})
	m.LimiterWait = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "limiter_wait_seconds",
		Help: "Time a ready batch waited for a quota token.", Buckets: latency})
	m.UpstreamCalls = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "upstream_calls_total",
		Help: "HTTP calls made to the upstream, each counted once, by result kind."}, []string{"result"})
	m.UpstreamDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "upstream_call_duration_seconds",
		Help: "Duration of upstream HTTP calls.", Buckets: latency})
	m.UpstreamRetries = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "upstream_retries_total",
		Help: "Accounts sent again, by reason (throttled, transient, split)."}, []string{"reason"})
	m.QueueAccounts = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "queue_accounts",
		Help: "Accounts waiting for an upstream call."})
	m.Quota = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "quota_calls_per_second",
		Help: "The app's upstream quota (-rate), for dashboards to draw calls/s against."})
	m.LimiterFallback = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "limiter_fallback",
		Help: "1 while the shared (Redis) limiter is unreachable and this replica uses its fallback share of the rate."})
	m.RateFactor = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "limiter_rate_factor",
		Help: "Part of -rate in force: below 1 for a while after the upstream throttled a call (cut by half, then back by 0.1 a second)."})
	for _, r := range []string{"ok", "transport", "http", "throttled", "auth", "not_found", "transient", "rejected"} {
		m.UpstreamCalls.WithLabelValues(r)
	}
	for _, r := range []string{"throttled", "transient", "split"} {
		m.UpstreamRetries.WithLabelValues(r)
	}
	reg.MustRegister(m.BatchAccounts, m.BatchWait, m.LimiterWait, m.UpstreamCalls, m.UpstreamDuration, m.UpstreamRetries, m.QueueAccounts, m.Quota, m.LimiterFallback, m.RateFactor)
}

// newRedis are the Redis tier's figures.
func (m *Metrics) newRedis(reg prometheus.Registerer) {
	m.RedisUp = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "redis_up",
		Help: "1 while the Redis tier is in use, 0 while it is skipped after an error (or not configured)."})
	m.RedisErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "redis_errors_total",
		Help: "Failed Redis operations, by op (get, put, claim, release, probe, change, feed, badtags; wrongtype: a key of another type at a record's name, a miss for that key only)."}, []string{"op"})
	m.RedisDropped = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "redis_dropped_writes_total",
		Help: "Cache write-backs not sent to Redis (Redis down or the write queue full)."})
	m.RedisRoundTrips = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "redis_round_trips_total",
		Help: "Pipelines sent to Redis (reads and write-backs)."})
	for _, op := range []string{"get", "put", "claim", "release", "probe", "wrongtype", "change", "feed", "badtags"} {
		m.RedisErrors.WithLabelValues(op)
	}
	reg.MustRegister(m.RedisUp, m.RedisErrors, m.RedisDropped, m.RedisRoundTrips)
}

// newChanges are the figures of portrait_set, callbacks and the changes they make.
func (m *Metrics) newChanges(reg prometheus.Registerer) {
	m.SetRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "set_requests_total",
		Help: "portrait_set requests answered, by result (ok or the IM error code class)."}, []string{"result"})
	m.Callbacks = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "callbacks_total",
		Help: "Change callbacks received, by result (ok, rejected: wrong app or signature, invalid: bad body or EventTime in the future, ignored: another command, repeat: a signed callback seen before, limited: unsigned callbacks over their rate)."}, []string{"result"})
	m.Changes = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "profile_changes_total",
		Help: "Profile changes applied to the cache, by source (set, callback, feed, account: an import or delete forwarded through this replica) and result (applied, old, unshared)."}, []string{"source", "result"})
	m.FeedDelay = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: namespace, Name: "change_feed_delay_seconds",
		Help: "From a change learned on one replica to its arrival on this one (clocks of replicas assumed in sync).", Buckets: latency})
	m.SetRequests.WithLabelValues("ok")
	for _, r := range []string{"ok", "rejected", "invalid", "ignored", "repeat", "limited"} {
		m.Callbacks.WithLabelValues(r)
	}
	for _, src := range []string{ChangeSet, ChangeCallback, ChangeFeed, ChangeAccount} {
		for _, r := range []string{ChangeApplied, ChangeOld, ChangeUnshared} {
			m.Changes.WithLabelValues(src, r)
		}
	}
	reg.MustRegister(m.SetRequests, m.Callbacks, m.Changes, m.FeedDelay)
}

// newIsolation are the figures of whole-call refusals isolated.
func (m *Metrics) newIsolation(reg prometheus.Registerer) {
	m.IsolationCalls = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "isolation_calls_total",
		Help: "Upstream calls made to isolate a whole-call refusal caused by one caller's request, by cause."}, []string{"cause"})
	m.IsolationGaveUp = prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: "isolation_unresolved_total",
		Help: "Accounts refused with a whole call's refusal because that refusal's isolation budget was spent."})
	m.RefusedTags = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "refused_tag_requests_total",
		Help: "Requests answered at once because they ask for a tag known to be refused, by source."}, []string{"source"})
	m.LearnedTags = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "learned_bad_tags",
		Help: "Tags this replica knows the upstream refuses (learned here or from other replicas)."})
	for _, c := range []string{IsolateTag, IsolateAccount, IsolateClass} {
		m.IsolationCalls.WithLabelValues(c)
	}
	m.RefusedTags.WithLabelValues(RefusedLearned)
	m.RefusedTags.WithLabelValues(RefusedConfigured)
	reg.MustRegister(m.IsolationCalls, m.IsolationGaveUp, m.RefusedTags, m.LearnedTags)
}

// newForward are the forwarded calls' and the API listener's TLS figures.
func (m *Metrics) newForward(reg prometheus.Registerer) {
	m.Forwarded = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "forwarded_requests_total",
		Help: "Calls to other IM APIs forwarded to the upstream (or refused before it), by IM service and result (ok, http, unreachable, timeout, rejected, canceled)."}, []string{"service", "result"})
	m.ForwardDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: namespace, Name: "forwarded_request_duration_seconds",
		Help: "Time from a forwarded call received to its answer passed on, by IM service.", Buckets: latency}, []string{"service"})
	m.TLSReloads = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "tls_certificate_reloads_total",
		Help: "Loads of the API listener's certificate after its files changed, by result (ok, error: the previous one is kept)."}, []string{"result"})
	m.TLSNotAfter = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: "tls_certificate_not_after_seconds",
		Help: "Expiry (Unix seconds) of the certificate the API listener serves; 0 without TLS."})
	for _, s := range append(ForwardServices, ServiceOther) {
		for _, r := range []string{ForwardOK, ForwardHTTP, ForwardUnreachable, ForwardTimeout, ForwardRejected, ForwardCanceled} {
			m.Forwarded.WithLabelValues(s, r)
		}
	}
	m.TLSReloads.WithLabelValues("ok")
	m.TLSReloads.WithLabelValues("error")
	m.Handoffs = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: "http_handoffs_total",
		Help: "API connections the lean HTTP/1.1 front handed to net/http, by reason (other_request, http_feature, limit, malformed, h2, tls_error)."}, []string{"reason"})
	reg.MustRegister(m.Forwarded, m.ForwardDuration, m.TLSReloads, m.TLSNotAfter, m.Handoffs)
}

// PoolStats are a connection pool's figures, as go-redis reports them.
type PoolStats struct {
	Hits, Misses, Timeouts uint32
	TotalConns, IdleConns  uint32
	StaleConns             uint32
}

// RegisterRedisPool exports the Redis client's pool figures, read at scrape
// time from stats: redis_pool_{hits,misses,timeouts,stale}_total and
// redis_pool_{total,idle}_connections.
func RegisterRedisPool(reg prometheus.Registerer, stats func() PoolStats) {
	counter := func(name, help string, f func(PoolStats) uint32) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help},
			func() float64 { return float64(f(stats())) })
	}
	gauge := func(name, help string, f func(PoolStats) uint32) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help},
			func() float64 { return float64(f(stats())) })
	}
	reg.MustRegister(
		counter("redis_pool_hits_total", "Redis pool: connections reused.", func(s PoolStats) uint32 { return s.Hits }),
		counter("redis_pool_misses_total", "Redis pool: connections dialed because none was free.", func(s PoolStats) uint32 { return s.Misses }),
		counter("redis_pool_timeouts_total", "Redis pool: waits for a connection that timed out.", func(s PoolStats) uint32 { return s.Timeouts }),
		counter("redis_pool_stale_total", "Redis pool: connections dropped as stale.", func(s PoolStats) uint32 { return s.StaleConns }),
		gauge("redis_pool_total_connections", "Redis pool: open connections.", func(s PoolStats) uint32 { return s.TotalConns }),
		gauge("redis_pool_idle_connections", "Redis pool: idle connections.", func(s PoolStats) uint32 { return s.IdleConns }),
	)
}
