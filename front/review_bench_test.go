package front

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
)

// BenchmarkKeepAliveLookup is one client's lookups on a keep-alive
// connection, one at a time, answered by the echo handler: the front's
// own cost per request (plus loopback syscalls).
func BenchmarkKeepAliveLookup(b *testing.B) {
	addr := benchServe(b, &echo{})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	req := []byte(lookup("sdkappid=1400000000&identifier=administrator&usersig=eJw1&random=1&contenttype=json",
		`{"To_Account":["user1"],"TagList":["Tag_Profile_IM_Nick"]}`, "User-Agent: Go-http-client/1.1", "Accept-Encoding: gzip"))
	br := bufio.NewReader(c)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// benchServe serves h with a front on a loopback port until the benchmark
// ends, and returns the address.
func benchServe(b *testing.B, h Handler) string {
	b.Helper()
	_, addr := serveFront(b, Config{Path: testPath, Handler: h, Fallback: &http.Server{}})
	return addr
}
