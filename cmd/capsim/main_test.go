package main

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"

	"github.com/portrait-proxy/portrait-proxy/capacity"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var small = []string{"-rate", "2000", "-accounts", "20000", "-skew", "0.9", "-replicas", "2", "-ttl", "10s", "-stale-ttl", "20s",
	"-warmup", "20s", "-duration", "20s", "-changes", "5", "-missing", "0.01", "-tags", "Tag_Profile_IM_Nick:2,Tag_Profile_IM_Nick+Tag_Profile_IM_Image:1"}

func TestRunSameSeedSameOutput(t *testing.T) {
	var a, b, c bytes.Buffer
	if err := run(small, &a, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if err := run(small, &b, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if a.String() != b.String() {
		t.Fatalf("same seed, different output:\n%s\n%s", a.String(), b.String())
	}
	for _, want := range []string{"in-process tier", "Redis tier", "upstream calls", "of the quota", "replica(s)", "commands"} {
		if !strings.Contains(a.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, a.String())
		}
	}
	if err := run(append(small, "-seed", "2"), &c, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	if a.String() == c.String() {
		t.Fatal("another seed printed the very same figures")
	}
}

func TestRunAutoReplicasAndJSON(t *testing.T) {
	var out bytes.Buffer
	args := append([]string{}, small...)
	args = append(args, "-rate", "100000", "-replicas", "0", "-json", "-warmup", "10s", "-duration", "10s")
	if err := run(args, &out, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Result struct{ Workload struct{ Replicas int } }
		Size   struct {
			Replicas int
			Cores    float64
		}
	}
	if err := json.Unmarshal(out.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	// 100,000 lookups/s, each at least an in-process hit's CPU, at the
	// planned share of a core each.
	least := int(math.Ceil(100000 * capacity.Measured.CPULocalHit.Seconds() / capacity.Measured.CoreBudget))
	if got.Size.Replicas < least || got.Result.Workload.Replicas != got.Size.Replicas {
		t.Fatalf("simulated with %d replicas, sized %d (%.1f cores)", got.Result.Workload.Replicas, got.Size.Replicas, got.Size.Cores)
	}
}

func TestRunRejects(t *testing.T) {
	for _, args := range [][]string{
		{"-rate", "0"},
		{"-accounts", "-5"},
		{"-tags", "Tag_Profile_IM_Nick:zero"},
		{"-tags", ":1"},
		{"-change-mode", "sometimes"},
		{"-batch-max", "1000"},
		{"-nosuchflag"},
		{"extra"},
	} {
		if err := run(args, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
}
