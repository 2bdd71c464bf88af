package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
)

// proc is a child process (the emulator or a proxy) that printed its
// addresses on stdout.
type proc struct {
	cmd   *exec.Cmd
	addrs []string
}

var addrRE = regexp.MustCompile(`https?://([0-9.]+:[0-9]+)`)

// startProc runs bin with args and env and waits for a stdout line holding
// at least n http:// addresses. A child that exits first (a build that
// refuses a flag, say) is reported at once with the first line it wrote
// to stderr.
func startProc(bin string, args, env []string, n int) (*proc, error) {
	return startServer(nil, bin, args, env, n)
}

// startServer is startProc for a server measured by the hot scenario: with
// pin on, it runs on the servers' CPU (pin nil: unpinned).
func startServer(pin *pinning, bin string, args, env []string, n int) (*proc, error) {
	name, argv := pin.command(bin, args)
	cmd := exec.Command(name, argv...)
	cmd.Env = append(os.Environ(), env...)
	head := &headWriter{max: 4096}
	cmd.Stderr = io.MultiWriter(os.Stderr, head)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	if err := pin.afterStart(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("%s: pinning to CPU %d: %w", filepath.Base(bin), pin.server, err)
	}
	lines := make(chan []string, 1)
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		sc := bufio.NewScanner(out)
		sent := false
		for sc.Scan() {
			if m := addrRE.FindAllStringSubmatch(sc.Text(), -1); !sent && len(m) >= n {
				var addrs []string
				for _, x := range m {
					addrs = append(addrs, x[1])
				}
				lines <- addrs
				sent = true
			}
		}
	}()
	select {
	case addrs := <-lines:
		return &proc{cmd: cmd, addrs: addrs}, nil
	case <-ended:
		select {
		case addrs := <-lines:
			return &proc{cmd: cmd, addrs: addrs}, nil
		default:
		}
		err := cmd.Wait()
		return nil, fmt.Errorf("%s exited before printing its address (%v): %s", filepath.Base(bin), err, head.firstLine())
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("%s did not print its address in 15s", filepath.Base(bin))
	}
}

// headWriter keeps the first max bytes written to it.
type headWriter struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (h *headWriter) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if room := h.max - len(h.b); room > 0 {
		h.b = append(h.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// firstLine is the first non-empty line written.
func (h *headWriter) firstLine() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for l := range strings.SplitSeq(string(h.b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			return l
		}
	}
	return "(nothing on stderr)"
}

// stop sends SIGTERM and waits (SIGKILL after 15s).
func (p *proc) stop() error {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		return errors.Join(errors.New("killed after 15s"), <-done)
	}
}

// cpu returns the process's user+system CPU time so far (Linux /proc).
func (p *proc) cpu() time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	s := string(raw)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * (time.Second / 100) // USER_HZ is 100 on Linux
}

// rssBytes returns the process's resident set size (Linux /proc).
func (p *proc) rssBytes() int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func simStats(ctx context.Context, base string) (imsim.Stats, error) {
	var st imsim.Stats
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/imsim/stats", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	return st, json.NewDecoder(resp.Body).Decode(&st)
}

func simReset(base string) error {
	resp, err := http.Post(base+"/imsim/reset", "", nil)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// scrape reads a proxy's /metrics into name{labels} → value.
func scrape(admin string) (map[string]float64, error) {
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(raw), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out, nil
}

// histMean is sum/count of histogram name between two scrapes.
func histMean(before, after map[string]float64, name string) float64 {
	n := after[name+"_count"] - before[name+"_count"]
	if n <= 0 {
		return 0
	}
	return (after[name+"_sum"] - before[name+"_sum"]) / n
}
