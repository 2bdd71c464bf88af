package main

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPlanPins(t *testing.T) {
	for _, c := range []struct {
		allowed     []int
		on          bool
		server, gen int
	}{{[]int{0, 1}, true, 1, 0}, {[]int{2, 5, 7}, true, 7, 2}, {[]int{0}, false, 0, 0}, {nil, false, 0, 0}} {
		p := planPins(c.allowed)
		if p.on() != c.on || (c.on && (p.server != c.server || p.gen != c.gen)) {
			t.Errorf("planPins(%v) = %+v, want on %v, server %d, generator %d", c.allowed, *p, c.on, c.server, c.gen)
		}
	}
	if w := planPins([]int{3}).words(); !strings.HasPrefix(w, "nothing pinned (the load generator may run on 1 CPU)") {
		t.Errorf("one CPU: %q", w)
	}
}

func TestPinningWordsAndCommand(t *testing.T) {
	p := &pinning{server: 1, gen: 0, taskset: "/usr/bin/taskset"}
	if w, want := p.words(), "servers pinned to CPU 1 (`taskset -c 1`) and the load generator (all its threads, with the emulator and Redis) to CPU 0"; w != want {
		t.Errorf("words %q, want %q", w, want)
	}
	name, args := p.command("bin/proxy", []string{"-listen", "x"})
	if name != "/usr/bin/taskset" || !slices.Equal(args, []string{"-c", "1", "bin/proxy", "-listen", "x"}) {
		t.Errorf("command: %s %v", name, args)
	}
	p.taskset = ""
	if w := p.words(); !strings.Contains(w, "sched_setaffinity on all their threads") {
		t.Errorf("words without taskset: %q", w)
	}
	for _, q := range []*pinning{nil, p, {unpinned: "x"}} {
		if name, args := q.command("bin/proxy", []string{"-v"}); name != "bin/proxy" || !slices.Equal(args, []string{"-v"}) {
			t.Errorf("%+v: command %s %v, want bin/proxy as is", q, name, args)
		}
	}
	if s := (*pinning)(nil).short(); s != "unpinned" {
		t.Errorf("nil short %q", s)
	}
}

// affinity is the CPUs thread tid may run on.
func affinity(t *testing.T, tid int) []int {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(tid, &set); err != nil {
		t.Fatal(err)
	}
	return cpuList(&set)
}

// TestPinHot pins this process, starts children both ways (taskset and
// moved after start) and checks every thread's CPUs, then the restore.
func TestPinHot(t *testing.T) {
	before := affinity(t, 0)
	if len(before) < 2 {
		t.Skipf("%d CPU: nothing to pin", len(before))
	}
	p, restore := pinHot()
	if !p.on() {
		restore()
		t.Fatalf("not pinned: %s", p.unpinned)
	}
	threads := func(pid int) []int {
		ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
		if err != nil {
			t.Fatal(err)
		}
		var tids []int
		for _, e := range ents {
			tid, _ := strconv.Atoi(e.Name())
			tids = append(tids, tid)
		}
		return tids
	}
	for _, tid := range threads(os.Getpid()) {
		if got := affinity(t, tid); !slices.Equal(got, []int{p.gen}) {
			t.Errorf("generator thread %d on CPUs %v, want [%d]", tid, got, p.gen)
		}
	}
	if p.taskset != "" {
		name, args := p.command("grep", []string{"Cpus_allowed_list", "/proc/self/status"})
		out, err := exec.Command(name, args...).Output()
		if err != nil || strings.Fields(string(out))[1] != strconv.Itoa(p.server) {
			t.Errorf("child through taskset: %q, %v; want CPU %d", out, err, p.server)
		}
	}
	moved := *p
	moved.taskset = ""
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	err := moved.afterStart(child.Process.Pid)
	got := affinity(t, child.Process.Pid)
	child.Process.Kill()
	child.Wait()
	if err != nil || !slices.Equal(got, []int{p.server}) {
		t.Errorf("child moved after start: CPUs %v, %v; want [%d]", got, err, p.server)
	}
	restore()
	for _, tid := range threads(os.Getpid()) {
		if got := affinity(t, tid); !slices.Equal(got, before) {
			t.Errorf("thread %d on CPUs %v after restore, want %v", tid, got, before)
		}
	}
}
