package im

import (
	"crypto/sha256"
	"encoding/hex"
)

// CallbackCommand is the change callback IM sends after a profile change.
const CallbackCommand = "Profile.CallbackPortraitSet"

// CallbackSign is the signature IM puts in a callback's URL (Sign) when the
// app has a callback token: hex(SHA-256(token + RequestTime)), RequestTime
// being the Unix seconds also in the URL.
func CallbackSign(token, requestTime string) string {
	sum := sha256.Sum256([]byte(token + requestTime))
	return hex.EncodeToString(sum[:])
}
