// Package etcdtest runs a real one-member etcd for tests (Debian's
// etcd-server, which make deps installs).
package etcdtest

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
)

// Start runs etcd on loopback with its data in a temporary directory,
// stops it at the end of the test, and returns its client URL. It does
// not wait for etcd to answer: clients retry with a deadline.
func Start(t testing.TB) string {
	t.Helper()
	return start(t, "http", "127.0.0.1")
}

// StartOn runs etcd like Start, serving its clients at host (an address
// of this machine other than 127.0.0.1, which other network namespaces
// can reach).
func StartOn(t testing.TB, host string) string {
	t.Helper()
	return start(t, "http", host)
}

// start runs a one-member etcd serving its clients over scheme at host,
// with extra flags, and returns its client URL.
func start(t testing.TB, scheme, host string, extra ...string) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd not found: run 'make deps' (installs etcd-server)")
	}
	client, peer := fmt.Sprintf("%s://%s:%d", scheme, host, freePort(t)), fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cmd := exec.Command(bin, append([]string{"--name", "t", "--data-dir", t.TempDir(), "--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "t=" + peer, "--log-level", "error"}, extra...)...)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("etcd log:\n%s", log.String())
		}
	})
	return client
}

// Member is one etcd member of a cluster StartCluster runs.
type Member struct {
	Name, Client, Peer, Dir string
	cmd                     *exec.Cmd
	log                     *bytes.Buffer
}

// Kill stops the member at once (SIGKILL) and waits for it.
func (m *Member) Kill() {
	if m.cmd != nil && m.cmd.Process != nil {
		m.cmd.Process.Kill()
		m.cmd.Wait()
		m.cmd = nil
	}
}

// StartCluster runs an n-member cluster on loopback (members m0, m1, ...),
// each with its data in a temporary directory, killed at the end of the
// test. Like Start, it does not wait for the members to answer.
func StartCluster(t testing.TB, n int) []*Member {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		t.Fatalf("etcd not found: run 'make deps' (installs etcd-server)")
	}
	ms := make([]*Member, n)
	var cluster []string
	for i := range ms {
		ms[i] = &Member{Name: fmt.Sprintf("m%d", i), Client: fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
			Peer: fmt.Sprintf("http://127.0.0.1:%d", freePort(t)), Dir: t.TempDir(), log: &bytes.Buffer{}}
		cluster = append(cluster, ms[i].Name+"="+ms[i].Peer)
	}
	for _, m := range ms {
		m.cmd = exec.Command(bin, "--name", m.Name, "--data-dir", m.Dir, "--listen-client-urls", m.Client, "--advertise-client-urls", m.Client,
			"--listen-peer-urls", m.Peer, "--initial-advertise-peer-urls", m.Peer, "--initial-cluster", strings.Join(cluster, ","),
			"--initial-cluster-state", "new", "--log-level", "error")
		m.cmd.Stdout, m.cmd.Stderr = m.log, m.log
		if err := m.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			m.Kill()
			if t.Failed() {
				t.Logf("etcd %s log:\n%s", m.Name, m.log.String())
			}
		})
	}
	return ms
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// StartTLS runs etcd like Start but serving its clients over TLS with
// certFile and keyFile, requiring client certificates signed by caFile,
// and returns its https client URL.
func StartTLS(t testing.TB, certFile, keyFile, caFile string) string {
	t.Helper()
	return start(t, "https", "127.0.0.1", "--cert-file", certFile, "--key-file", keyFile, "--trusted-ca-file", caFile, "--client-cert-auth")
}
