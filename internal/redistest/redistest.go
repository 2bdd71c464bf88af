// Package redistest starts real redis-server processes for tests: single
// servers and 3-master clusters, on free loopback ports, in the test's
// temporary directory, stopped when the test ends. Tests that need Redis
// fail with an installation hint when redis-server is missing.
package redistest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is one redis-server process.
type Server struct {
	t    testing.TB
	Port int
	// Password is the default user's (from a --requirepass argument); Do
	// authenticates with it.
	Password string
	dir      string
	args     []string
	cmd      *exec.Cmd
}

// Addr is host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// URL is the redis:// URL of database 0.
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

func need(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		t.Fatal("redis-server is not installed; the tests start their own. Install it: apt-get install -y redis-server redis-tools")
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Start runs a redis-server with extra config arguments (e.g.
// "--cluster-enabled", "yes") and waits until it answers PING.
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	need(t)
	s := &Server{t: t, dir: t.TempDir()}
	for i, a := range extra {
		if a == "--requirepass" && i+1 < len(extra) {
			s.Password = extra[i+1]
		}
	}
	s.args = append([]string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", s.dir,
		"--protected-mode", "no"}, extra...)
	for attempt := 0; ; attempt++ {
		s.Port = freePort(t)
		if err := s.start(); err == nil {
			break
		} else if attempt == 4 {
			t.Fatalf("redis-server would not start: %v", err)
		}
	}
	t.Cleanup(s.Kill)
	return s
}

func (s *Server) start() error {
	args := append([]string{"--port", strconv.Itoa(s.Port)}, s.args...)
	s.cmd = exec.Command("redis-server", args...)
	s.cmd.Dir = s.dir
	if err := s.cmd.Start(); err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if reply, err := s.Do("PING"); err == nil && reply == "PONG" {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	s.Kill()
	return fmt.Errorf("no PONG on port %d", s.Port)
}

// Kill stops the server at once (SIGKILL), as a crash would.
func (s *Server) Kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// Pause stops the server without closing its connections (SIGSTOP), as a
// hung server would; Resume lets it go on.
func (s *Server) Pause() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Signal(syscall.SIGSTOP)
	}
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// Restart starts a killed server again on the same port, empty.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	var err error
	for range 50 { // the port may linger briefly
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.t.Fatalf("restart on port %d: %v", s.Port, err)
}

// Do runs one command over a fresh connection with a tiny RESP client and
// returns a simple or bulk string reply (or the integer as a string).
func (s *Server) Do(args ...string) (string, error) {
	conn, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	var b strings.Builder
	command := func(args ...string) {
		fmt.Fprintf(&b, "*%d\r\n", len(args))
		for _, a := range args {
			fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
		}
	}
	if s.Password != "" {
		command("AUTH", s.Password)
	}
	command(args...)
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return "", err
	}
	r := bufio.NewReader(conn)
	if s.Password != "" {
		if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "+OK") {
			return "", fmt.Errorf("redis: AUTH: %q %v", line, err)
		}
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", fmt.Errorf("redis: %s", line[1:])
	case '$':
		n, _ := strconv.Atoi(line[1:])
		if n < 0 {
			return "", nil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return "", err
		}
		return string(buf[:n]), nil
	}
	return line, nil
}

// Cluster is a Redis Cluster of masters only.
type Cluster struct {
	Servers []*Server
}

// Addrs is the comma list of host:port the proxy's -redis flag takes.
func (c *Cluster) Addrs() string {
	var a []string
	for _, s := range c.Servers {
		a = append(a, s.Addr())
	}
	return strings.Join(a, ",")
}

// StartCluster starts n masters with cluster mode on (and extra config
// arguments, e.g. "--requirepass", "pw"), joins them with redis-cli
// --cluster create, and waits until the cluster is ok.
func StartCluster(t testing.TB, n int, extra ...string) *Cluster {
	t.Helper()
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Fatal("redis-cli is not installed; install it: apt-get install -y redis-tools")
	}
	c := &Cluster{}
	for range n {
		c.Servers = append(c.Servers, Start(t, append([]string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-node-timeout", "2000"}, extra...)...))
	}
	args := []string{"--cluster", "create"}
	if pw := c.Servers[0].Password; pw != "" {
		args = append([]string{"--no-auth-warning", "-a", pw}, args...)
	}
	for _, s := range c.Servers {
		args = append(args, s.Addr())
	}
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for _, s := range c.Servers {
		for {
			info, err := s.Do("CLUSTER", "INFO")
			if err == nil && strings.Contains(info, "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster not ok: %q %v", info, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c
}
