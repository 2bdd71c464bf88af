package im

import (
	"time"
)

// IM REST API error codes the proxy and the emulator use by name.
const (
	CodeBadRequest      = 40001 // request could not be unpacked
	CodeNoAccount       = 40002 // To_Account missing or empty
	CodeAccountNotFound = 40003 // account does not exist
	CodeNeedAdmin       = 40004 // not an admin
	CodeInternal        = 40006 // internal error, retry
	CodeTagNoPermission = 40007
	CodeTagNotExist     = 40009
	CodeInvalidTag      = 40801
	CodeNoStdData       = 40807 // no standard profile data for the account
	CodeNoCustomData    = 40809 // no custom profile data for the account

	CodeHTTPParse       = 60002
	CodeJSONParse       = 60003
	CodeSDKAppIDInvalid = 60006
	CodeFreqLimit       = 60007 // REST API call frequency limit
	CodeNeedAdmin2      = 60010
	CodeAppFreqLimit    = 60011
	CodeSDKAppIDMissing = 60012
	CodeAccountType     = 60015 // an account field is not a string
	CodeTooFrequent     = 60018
	CodeTooFrequent2    = 60019

	CodeSigExpired      = 70001
	CodeSigEmpty        = 70002
	CodeSigUnparseable  = 70003
	CodeSigMismatch     = 70009
	CodeSigIdentifier   = 70013
	CodeSigSDKAppID     = 70014
	CodeSigFailureLimit = 70050
	CodeInternalTimeout = 70169
	CodeNotImported     = 70107
)

// Kind classifies an IM error code by what a caller should do about it.
type Kind int

// Kinds of outcome, for a whole call or one account.
const (
	KindOK        Kind = iota
	KindTransport      // no answer: connection failure, timeout
	KindHTTP           // an HTTP status other than 200
	KindThrottled      // too frequent: slow down and retry the same accounts
	KindAuth           // the proxy's credentials or app are wrong: retrying will not help
	KindNotFound       // the account does not exist or has no data: cacheable briefly
	KindTransient      // the upstream failed internally: retry, do not cache
	KindRejected       // the request itself is wrong
)

var kindNames = [...]string{"ok", "transport", "http", "throttled", "auth", "not_found", "transient", "rejected"}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "unknown"
}

// Classify returns the Kind of an IM error code, 0 being KindOK. Codes the
// public documentation does not list are treated as transient, so the proxy
// never caches an outcome it does not understand.
func Classify(code int) Kind {
	switch code {
	case 0:
		return KindOK
	case CodeFreqLimit, CodeAppFreqLimit, CodeTooFrequent, CodeTooFrequent2, CodeSigFailureLimit:
		return KindThrottled
	case CodeAccountNotFound, CodeNoStdData, CodeNoCustomData, CodeNotImported:
		return KindNotFound
	case CodeNeedAdmin, CodeSDKAppIDInvalid, CodeNeedAdmin2, CodeSDKAppIDMissing, 60020, 60021:
		return KindAuth
	case CodeBadRequest, CodeNoAccount, CodeTagNoPermission, CodeTagNotExist, CodeInvalidTag, 40804, 40806,
		CodeHTTPParse, CodeJSONParse, CodeAccountType:
		return KindRejected
	}
	if code >= 70001 && code <= 70052 {
		return KindAuth
	}
	return KindTransient
}

// SigFailureRetryAfter is how long the upstream says to wait after 70050
// (failed UserSig checks of the app are being rate-limited).
const SigFailureRetryAfter = time.Minute

// Throttling reports whether code means "too frequent".
func Throttling(code int) bool { return Classify(code) == KindThrottled }
