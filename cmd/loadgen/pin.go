package main

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"

	"golang.org/x/sys/unix"
)

// pinning is where the hot scenario runs its processes, as issue 17
// defines the measurement: the servers (the bare handler, this build's
// proxy, the previous build's) on one CPU, the load generator on another.
// The emulator and redis-server are started by the load generator while
// it is pinned, so they inherit its CPU.
type pinning struct {
	server, gen int // CPU numbers
	// taskset is the taskset binary the servers are started through, so
	// that their Go runtime starts on the server CPU; "": each server is
	// moved there (all its threads) right after it starts.
	taskset string
	// unpinned says why nothing is pinned; "" when pinned.
	unpinned string
}

// planPins picks the CPUs among those the load generator may run on
// (allowed, ascending): the last for the servers, the first for the
// generator. With fewer than two, nothing is pinned.
func planPins(allowed []int) *pinning {
	if len(allowed) < 2 {
		return &pinning{unpinned: fmt.Sprintf("the load generator may run on %d CPU", len(allowed))}
	}
	return &pinning{server: allowed[len(allowed)-1], gen: allowed[0]}
}

// on reports whether the servers and the generator are pinned.
func (p *pinning) on() bool { return p != nil && p.unpinned == "" }

// words says how the hot scenario's processes ran, for the report.
func (p *pinning) words() string {
	switch {
	case p == nil:
		return "nothing pinned: the servers and the load generator share the cores"
	case !p.on():
		return fmt.Sprintf("nothing pinned (%s): the servers and the load generator share the cores", p.unpinned)
	}
	how := fmt.Sprintf("`taskset -c %d`", p.server)
	if p.taskset == "" {
		how = "sched_setaffinity on all their threads right after start"
	}
	return fmt.Sprintf("servers pinned to CPU %d (%s) and the load generator (all its threads, with the emulator and Redis) to CPU %d",
		p.server, how, p.gen)
}

// command is how a server is started: through taskset when pinned and
// it exists, else as is.
func (p *pinning) command(bin string, args []string) (string, []string) {
	if !p.on() || p.taskset == "" {
		return bin, args
	}
	return p.taskset, append([]string{"-c", strconv.Itoa(p.server), bin}, args...)
}

// afterStart moves a server started without taskset to the server CPU.
// It inherited the pinned generator's single CPU, so its Go runtime
// already sized GOMAXPROCS to 1.
func (p *pinning) afterStart(pid int) error {
	if !p.on() || p.taskset != "" {
		return nil
	}
	var set unix.CPUSet
	set.Set(p.server)
	return setTasks(pid, &set)
}

// pinHot pins the load generator to its CPU for the hot scenario and
// picks the servers' CPU; restore puts the generator's threads back on
// the CPUs they had.
func pinHot() (p *pinning, restore func()) {
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return &pinning{unpinned: "sched_getaffinity: " + err.Error()}, func() {}
	}
	p = planPins(cpuList(&old))
	if !p.on() {
		return p, func() {}
	}
	if path, err := exec.LookPath("taskset"); err == nil {
		p.taskset = path
	}
	var gen unix.CPUSet
	gen.Set(p.gen)
	if err := setTasks(os.Getpid(), &gen); err != nil {
		setTasks(os.Getpid(), &old)
		return &pinning{unpinned: "pinning the load generator failed: " + err.Error()}, func() {}
	}
	// The Go runtime (1.25 on) follows the new affinity with GOMAXPROCS 1
	// by itself, and back.
	return p, func() { setTasks(os.Getpid(), &old) }
}

// cpuList is the CPUs in set, ascending.
func cpuList(set *unix.CPUSet) []int {
	var out []int
	for c := range len(set) * 64 {
		if set.IsSet(c) {
			out = append(out, c)
		}
	}
	return out
}

// setTasks sets the affinity of every thread of process pid (Linux's
// sched_setaffinity applies to one thread). It reads /proc/pid/task again
// until no new thread shows up, so that one cloned meanwhile from a
// thread not yet moved is moved too.
func setTasks(pid int, set *unix.CPUSet) error {
	done := map[int]bool{}
	for {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return err
		}
		fresh := false
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, set); err != nil && err != unix.ESRCH {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
			done[tid], fresh = true, true
		}
		if !fresh {
			return nil
		}
	}
}

// short is words in a few, for a table cell.
func (p *pinning) short() string {
	if !p.on() {
		return "unpinned"
	}
	return fmt.Sprintf("servers on CPU %d, generator on CPU %d", p.server, p.gen)
}

// hotPinAside qualifies the report's "every figure includes the load
// generator's own CPU" for the hot scenario.
func (r *report) hotPinAside() string {
	switch {
	case r.hotPin == nil:
		return ""
	case r.hotPin.on():
		return " — except the hot scenario's: " + r.hotPin.words()
	}
	return " — the hot scenario's too: " + r.hotPin.words()
}

// capitalize upper-cases s's first letter (ASCII).
func capitalize(s string) string {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return s
	}
	return string(s[0]-'a'+'A') + s[1:]
}
