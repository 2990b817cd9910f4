package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// netns runs a command inside a network namespace.
func netnsCmd(ns string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
}

func mustRun(tb testing.TB, cmd *exec.Cmd) string {
	tb.Helper()
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return string(out)
}

// TestAgentsInNetworkNamespaces puts the two sites in two network
// namespaces joined by a veth pair, replicates across it, takes the link
// down while the source keeps writing, brings it back, and checks that the
// replica caught up.
func TestAgentsInNetworkNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root to create network namespaces (CI runs as root)")
	}
	need(t, "ip", "qemu-io")
	suffix := fmt.Sprint(os.Getpid() % 10000)
	nsA, nsB := "ferryA"+suffix, "ferryB"+suffix
	vA, vB := "fa"+suffix, "fb"+suffix
	for _, ns := range []string{nsA, nsB} {
		mustRun(t, exec.Command("ip", "netns", "add", ns))
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	mustRun(t, exec.Command("ip", "link", "add", vA, "netns", nsA, "type", "veth", "peer", "name", vB, "netns", nsB))
	mustRun(t, exec.Command("ip", "-n", nsA, "addr", "add", "10.77.0.1/24", "dev", vA))
	mustRun(t, exec.Command("ip", "-n", nsB, "addr", "add", "10.77.0.2/24", "dev", vB))
	for _, x := range [][2]string{{nsA, vA}, {nsB, vB}} {
		mustRun(t, exec.Command("ip", "-n", x[0], "link", "set", x[1], "up"))
		mustRun(t, exec.Command("ip", "-n", x[0], "link", "set", "lo", "up"))
	}
	pk := t.TempDir()
	run(t, ferryBin, "ca", "init", "--pki", pk)
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "site", "--host", "10.77.0.1", "siteA")
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "site", "--host", "10.77.0.2", "siteB")
	run(t, ferryBin, "ca", "issue", "--pki", pk, "--role", "operator", "operator")
	root := t.TempDir()
	type site struct{ ns, name, addr, dir string }
	A := site{nsA, "siteA", "10.77.0.1:7410", filepath.Join(root, "a")}
	B := site{nsB, "siteB", "10.77.0.2:7410", filepath.Join(root, "b")}
	for _, s := range []site{A, B} {
		cmd := netnsCmd(s.ns, ferryBin, "agent", "run", "--dir", s.dir, "--name", s.name, "--listen", s.addr, "--pki", pk, "--point-interval", "100ms")
		var log bytes.Buffer
		cmd.Stdout, cmd.Stderr = &log, &log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	}
	cli := func(s site, args ...string) string {
		t.Helper()
		words := 1
		if args[0] == "group" || args[0] == "view" {
			words = 2
		}
		full := append([]string{ferryBin, "--output", "json", "agent"}, args[:words]...)
		full = append(full, "--agent", s.addr, "--site", s.name, "--pki", pk)
		return mustRun(t, netnsCmd(s.ns, append(full, args[words:]...)...))
	}
	status := func(s site) map[string]any {
		t.Helper()
		var st map[string]any
		if err := json.Unmarshal([]byte(cli(s, "status")), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFor("both agents", func() bool {
		for _, s := range []site{A, B} {
			if err := netnsCmd(s.ns, ferryBin, "agent", "status", "--agent", s.addr, "--site", s.name, "--pki", pk).Run(); err != nil {
				return false
			}
		}
		return true
	})
	cli(A, "group", "create", "--disk", "vda=64M", "vm1")
	cli(A, "replicate", "--to", B.addr, "--to-site", "siteB", "vm1")
	sockA := filepath.Join(A.dir, "nbd.sock")
	uri := "nbd+unix:///vm1/vda?socket=" + sockA
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "flush", uri)
	repl := func() map[string]any {
		g := status(A)["groups"].([]any)[0].(map[string]any)
		r, _ := g["replication"].(map[string]any)
		if r == nil {
			return map[string]any{}
		}
		r["group_last_seq"] = g["last_seq"]
		return r
	}
	drained := func() bool {
		r := repl()
		return r["state"] == "streaming" && r["acked_seq"] == r["group_last_seq"]
	}
	waitFor("the first drain", drained)

	// Cut the link: the source keeps taking writes.
	mustRun(t, exec.Command("ip", "-n", nsA, "link", "set", vA, "down"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 8M 8M", "-c", "flush", uri)
	waitFor("the source to notice", func() bool {
		r := repl()
		return r["state"] != "streaming" || r["acked_seq"] != r["group_last_seq"]
	})
	if r := repl(); r["rpo_seconds"].(float64) <= 0 {
		t.Fatalf("RPO is 0 with unacknowledged writes: %v", r)
	}
	mustRun(t, exec.Command("ip", "-n", nsA, "link", "set", vA, "up"))
	waitFor("the drain after the outage", drained)
	cli(A, "mark", "--label", "after-outage", "vm1")
	var vi map[string]any
	waitFor("the point at the recovery site", func() bool {
		var pts []map[string]any
		json.Unmarshal([]byte(cli(B, "points", "vm1")), &pts)
		for _, p := range pts {
			if p["label"] == "after-outage" {
				return true
			}
		}
		return false
	})
	json.Unmarshal([]byte(cli(B, "view", "open", "vm1", "vda")), &vi)
	out := run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 8M", "-c", "read -P 0x22 8M 8M", "-c", "read -P 0 16M 1M",
		fmt.Sprintf("nbd+unix:///%s?socket=%s", vi["export"], vi["socket"]))
	if strings.Contains(out, "fail") {
		t.Fatalf("view after the outage:\n%s", out)
	}
}
