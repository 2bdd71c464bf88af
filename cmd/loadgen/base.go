package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// goTool is the go command: it builds the previous revision and reads
// the CPU profiles (go tool pprof).
var goTool = "go"

// baseBuild is the previous build: the proxy of an earlier git revision,
// measured beside this one in the same run.
type baseBuild struct {
	rev   string // as asked (-base)
	dir   string // where its proxy is built (-base-bin)
	desc  string // short hash, commit date and subject
	proxy string // its proxy binary; empty when it could not be built
	notes []string
}

func (b *baseBuild) ok() bool { return b != nil && b.proxy != "" }

func (b *baseBuild) note(format string, a ...any) {
	if b != nil {
		b.notes = append(b.notes, fmt.Sprintf(format, a...))
	}
}

// name labels the previous build in tables.
func (b *baseBuild) name() string {
	if b == nil || b.desc == "" {
		return "previous build"
	}
	return "previous build (" + strings.Fields(b.desc)[0] + ")"
}

// short is the revision's short hash and date, or the revision as asked.
func (b *baseBuild) short() string {
	if f := strings.Fields(b.desc); len(f) >= 2 {
		return f[0] + ", " + f[1]
	}
	return b.rev
}

// buildBase builds cmd/proxy of git revision rev into dir from a clean
// export of that revision (git archive into a temporary folder, removed
// afterwards), so neither the working tree nor its uncommitted changes
// play a part. A revision that cannot be resolved or built leaves the
// build without a binary and a note saying why: the scenarios then measure
// the current build and the bare handler only.
func buildBase(rev, dir string, out io.Writer) *baseBuild {
	b := &baseBuild{rev: rev, dir: dir}
	fail := func(format string, a ...any) *baseBuild {
		b.note("the previous build (%s) was not measured: %s", rev, fmt.Sprintf(format, a...))
		fmt.Fprintf(out, "previous build: %s\n\n", b.notes[len(b.notes)-1])
		return b
	}
	hash, err := execOutput("git", "rev-parse", "--verify", "--quiet", rev+"^{commit}")
	if err != nil {
		return fail("git cannot resolve the revision (a shallow clone?)")
	}
	hash = strings.TrimSpace(hash)
	if head, err := execOutput("git", "rev-parse", "HEAD"); err == nil && strings.TrimSpace(head) == hash {
		b.note("the previous build's revision is HEAD itself (nothing committed since the report was last regenerated, or a shallow clone): the two builds differ only by uncommitted changes")
	}
	if d, err := execOutput("git", "log", "-1", "--format=%h %cs %s", hash); err == nil {
		b.desc = strings.TrimSpace(d)
		if r := []rune(b.desc); len(r) > 100 {
			b.desc = string(r[:99]) + "…"
		}
	}
	src, err := os.MkdirTemp("", "loadgen-base")
	if err != nil {
		return fail("%v", err)
	}
	defer os.RemoveAll(src)
	if err := gitExport(hash, src); err != nil {
		return fail("git archive: %v", err)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fail("%v", err)
	}
	t0 := time.Now()
	cmd := exec.Command(goTool, "build", "-o", filepath.Join(abs, "proxy"), "./cmd/proxy")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fail("go build: %v: %s", err, lastLines(string(msg), 3))
	}
	b.proxy = filepath.Join(abs, "proxy")
	fmt.Fprintf(out, "previous build: %s, built into %s in %v\n\n", b.desc, dir, time.Since(t0).Round(time.Second))
	return b
}

// gitExport writes the tree of commit hash into dir.
func gitExport(hash, dir string) error {
	cmd := exec.Command("git", "archive", "--format=tar", hash)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	r, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	err = untar(r, dir)
	io.Copy(io.Discard, r)
	if werr := cmd.Wait(); werr != nil {
		return fmt.Errorf("%v: %s", werr, strings.TrimSpace(stderr.String()))
	}
	return err
}

func untar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Join(dir, filepath.FromSlash(h.Name))
		if !strings.HasPrefix(name, filepath.Clean(dir)+string(filepath.Separator)) {
			continue
		}
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(name, 0o755)
		case tar.TypeReg:
			err = writeFile(name, tr, h.FileInfo().Mode().Perm())
		}
		if err != nil {
			return err
		}
	}
}

func writeFile(name string, r io.Reader, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode|0o200)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	return errors.Join(err, f.Close())
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], " / ")
}

// startProfiled starts the emulator and a proxy (o.proxyPath()) with the
// profiling endpoints on its admin listener. A build that refuses -pprof
// is started without it (profiled is then false); one that does not start
// at all is an error.
func startProfiled(o options, extra ...string) (e *env, profiled bool, err error) {
	e, err = startEnvArgs(o, append([]string{"-pprof"}, extra...)...)
	if err == nil {
		return e, true, nil
	}
	e, err2 := startEnvArgs(o, extra...)
	if err2 != nil {
		return nil, false, err
	}
	return e, false, nil
}

// profile is a CPU profile taken of one proxy.
type profile struct {
	path      string // the pprof file, "" when none was taken
	flat, cum string // go tool pprof -top, by flat and by cumulative time, trimmed
	note      string // why there is none
}

// takeProfile asks the proxy at admin for a CPU profile of secs seconds
// and writes it to dir/name.pprof, with its top entries.
func takeProfile(admin string, secs int, dir, name string) *profile {
	p := &profile{}
	c := &http.Client{Timeout: time.Duration(secs+15) * time.Second}
	resp, err := c.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, secs))
	if err != nil {
		p.note = err.Error()
		return p
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		p.note = fmt.Sprintf("HTTP %d %v", resp.StatusCode, err)
		return p
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.note = err.Error()
		return p
	}
	p.path = filepath.Join(dir, name+".pprof")
	if err := os.WriteFile(p.path, raw, 0o644); err != nil {
		p.note, p.path = err.Error(), ""
		return p
	}
	if p.flat, err = pprofTop(p.path, false); err == nil {
		p.cum, err = pprofTop(p.path, true)
	}
	if err != nil {
		p.note = err.Error()
	}
	return p
}

// pprofTop is go tool pprof -top -nodecount=12 of the profile at path
// (sorted by cumulative time if cum), without the header lines that name
// the file and the build, and with the module's path left out of names.
func pprofTop(path string, cum bool) (string, error) {
	args := []string{"tool", "pprof", "-top", "-nodecount=12", "-symbolize=none"}
	if cum {
		args = append(args, "-cum")
	}
	out, err := exec.Command(goTool, append(args, path)...).Output()
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %v", err)
	}
	var b strings.Builder
	for l := range strings.SplitSeq(strings.TrimRight(string(out), "\n"), "\n") {
		if strings.HasPrefix(l, "File:") || strings.HasPrefix(l, "Build ID:") || strings.HasPrefix(l, "Type:") ||
			strings.HasPrefix(l, "Time:") || strings.HasPrefix(l, "Dropped") {
			continue
		}
		l = strings.ReplaceAll(l, "github.com/portrait-proxy/portrait-proxy/", "")
		if r := []rune(l); len(r) > 130 {
			l = string(r[:129]) + "…"
		}
		b.WriteString(l + "\n")
	}
	return b.String(), nil
}
