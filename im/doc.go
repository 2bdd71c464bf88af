// Package im is the wire protocol of the IM REST API's profile calls, as
// both sides speak it: the request and answer types of
// v4/profile/portrait_get and portrait_set, the error codes and what each
// means for a caller (Classify), the standard and custom tags and their
// limits, the change callback's command and signature, and a fast encoder
// of portrait_get answers.
//
// It holds no client and no server: the upstream package calls the API,
// httpapi answers it, and imsim plays it. Everything here is a fact of the
// protocol, documented in ../shared/docs/im-api.md.
package im
