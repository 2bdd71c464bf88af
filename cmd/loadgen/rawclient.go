package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// poster sends request bodies to one URL and returns the answers' bodies
// (valid until the next call).
type poster interface {
	post(body string) ([]byte, error)
	close()
}

func rawDial(url string) (poster, error) { return newRawConn(url) }

// httpPoster posts with net/http, as the app servers call the proxy: one
// client shared by every caller, its keep-alive pool holding a connection
// per concurrent caller.
type httpPoster struct {
	client *http.Client
	url    string
	body   bytes.Buffer
}

// appClient is an app server's client for callers concurrent callers: the
// default transport with an idle pool large enough to keep every caller's
// connection alive.
func appClient(callers int) *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns, tr.MaxIdleConnsPerHost = callers, callers
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// httpDial returns a dial function for startColdLoopWith whose callers
// share client.
func httpDial(client *http.Client) func(url string) (poster, error) {
	return func(url string) (poster, error) { return &httpPoster{client: client, url: url}, nil }
}

func (h *httpPoster) post(body string) ([]byte, error) {
	req, err := http.NewRequest(http.MethodPost, h.url, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	h.body.Reset()
	if _, err := h.body.ReadFrom(resp.Body); err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return h.body.Bytes(), nil
}

func (h *httpPoster) close() {}

// rawConn is a minimal HTTP/1.1 keep-alive client for one connection:
// it writes a POST and reads a Content-Length answer. net/http's client
// costs several times more CPU per request, and on a 2-core machine the
// load generator's CPU is taken from the proxy it measures.
type rawConn struct {
	addr string
	path string // path and query
	host string
	conn net.Conn
	r    *bufio.Reader
	req  []byte
	body []byte
	// timeout bounds one request and its answer (zero: 30s); a request
	// that runs out of it is not sent again.
	timeout time.Duration
}

func newRawConn(rawURL string) (*rawConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	return &rawConn{addr: u.Host, host: u.Host, path: u.RequestURI()}, nil
}

var errBadAnswer = errors.New("malformed HTTP answer")

// post sends body and returns the answer's body (valid until the next call).
func (c *rawConn) post(body string) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		out, err := c.try(body)
		if err == nil || attempt == 1 {
			return out, err
		}
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			c.close() // its answer may still come: the connection is spent
			return nil, err
		}
		c.close() // the server may have closed an idle connection: redial once
	}
}

// dial connects c now, if it is not connected: otherwise its first post
// does.
func (c *rawConn) dial() error {
	if c.conn != nil {
		return nil
	}
	conn, err := net.DialTimeout("tcp", c.addr, 5*time.Second)
	if err != nil {
		return err
	}
	c.conn, c.r = conn, bufio.NewReaderSize(conn, 8192)
	return nil
}

func (c *rawConn) try(body string) ([]byte, error) {
	if err := c.dial(); err != nil {
		return nil, err
	}
	timeout := c.timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	c.conn.SetDeadline(time.Now().Add(timeout))
	c.req = append(c.req[:0], "POST "...)
	c.req = append(c.req, c.path...)
	c.req = append(c.req, " HTTP/1.1\r\nHost: "...)
	c.req = append(c.req, c.host...)
	c.req = append(c.req, "\r\nContent-Type: application/json\r\nContent-Length: "...)
	c.req = strconv.AppendInt(c.req, int64(len(body)), 10)
	c.req = append(c.req, "\r\n\r\n"...)
	c.req = append(c.req, body...)
	if _, err := c.conn.Write(c.req); err != nil {
		return nil, err
	}
	status, err := c.r.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if !bytes.HasPrefix(status, []byte("HTTP/1.1 ")) {
		return nil, errBadAnswer
	}
	code := string(status[9:12])
	length := -1
	for {
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		if len(line) <= 2 {
			break
		}
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(k, []byte("Content-Length")) {
			length, err = strconv.Atoi(string(bytes.TrimSpace(v)))
			if err != nil {
				return nil, errBadAnswer
			}
		}
	}
	if length < 0 {
		return nil, fmt.Errorf("%w: no Content-Length", errBadAnswer)
	}
	if cap(c.body) < length {
		c.body = make([]byte, length)
	}
	c.body = c.body[:length]
	if _, err := io.ReadFull(c.r, c.body); err != nil {
		return nil, err
	}
	if code != "200" {
		return nil, fmt.Errorf("HTTP %s", code)
	}
	return c.body, nil
}

func (c *rawConn) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}
