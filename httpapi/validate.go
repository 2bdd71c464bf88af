package httpapi

// MaxAccountIDBytes is the longest account id IM accepts.
const MaxAccountIDBytes = 32

// validAccount reports whether id is 1–32 bytes of printable ASCII.
func validAccount(id string) bool {
	if len(id) == 0 || len(id) > MaxAccountIDBytes {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return false
		}
	}
	return true
}
