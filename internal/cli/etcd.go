package cli

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dr/ferry/internal/api"
)

// forceNewClusterCmd is the explicit way out for an installation whose
// etcd has two members (two sites, no witness) and has lost one: etcd
// needs a majority, so the surviving member alone serves nothing, and no
// vault can lead. The operator, having made sure that the other site is
// gone, restarts the surviving member as a one-member cluster.
func forceNewClusterCmd(e *env) *cobra.Command {
	var name, data, clientURL, peerURL, others, bin string
	c := &cobra.Command{Use: "force-new-cluster", Short: "Restart this site's etcd member as a one-member cluster after the other site is lost (two sites, no witness)", Args: cobra.NoArgs,
		Long: "etcd needs a majority of its members: with two sites and no witness, losing one site stops the\n" +
			"store, and no vault can act. Once the other site is surely gone, stop this site's etcd member\n" +
			"and run this command: it refuses while any other member answers (that would split the\n" +
			"installation in two), then runs etcd with --force-new-cluster on this member's data, which\n" +
			"keeps every document and makes the member the whole cluster. It serves until stopped; then run\n" +
			"etcd as usual. To bring the other site back, wipe its etcd data and add it again with\n" +
			"'etcdctl member add' (docs/ha.md).",
		Example: "  systemctl stop etcd   # this site's member\n" +
			"  ferry vault force-new-cluster --name east --data-dir /var/lib/etcd --client-url http://10.0.0.1:2379 \\\n" +
			"      --peer-url http://10.0.0.1:2380 --others http://10.1.0.1:2379",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			if name == "" || data == "" || clientURL == "" || peerURL == "" || others == "" {
				return usagef("--name, --data-dir, --client-url, --peer-url and --others are required")
			}
			if _, err := os.Stat(data); err != nil {
				return usagef("--data-dir %s: %v", data, err)
			}
			if answers(ctx, clientURL) {
				return fmt.Errorf("%w: this site's etcd member answers at %s: stop it first (it holds %s)", api.ErrConflict, clientURL, data)
			}
			for _, o := range strings.Split(others, ",") {
				if answers(ctx, o) {
					return fmt.Errorf("%w: the etcd member at %s answers: the other site is not gone, and forcing a new cluster here would give the installation two control planes; fix the link instead", api.ErrConflict, o)
				}
			}
			path, err := exec.LookPath(bin)
			if err != nil {
				return fmt.Errorf("etcd not found (%s): install etcd-server", bin)
			}
			cmd := exec.Command(path, "--force-new-cluster", "--name", name, "--data-dir", data,
				"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
				"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL, "--log-level", "warn")
			w := &lockedWriter{w: e.stderr} // etcd's output and ours
			cmd.Stdout, cmd.Stderr = w, w
			if err := cmd.Start(); err != nil {
				return err
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			deadline := time.Now().Add(30 * time.Second)
			for !answers(ctx, clientURL) {
				select {
				case err := <-done:
					return fmt.Errorf("etcd --force-new-cluster exited: %v (its log is above)", err)
				case <-time.After(100 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					<-done
					return fmt.Errorf("etcd --force-new-cluster did not answer at %s within 30 s", clientURL)
				}
			}
			fmt.Fprintf(w, "etcd member %s now is a one-member cluster at %s with every document; the vaults can lead again.\n"+
				"Stop this command (Ctrl-C) and run etcd as usual when convenient; add the other site back with 'etcdctl member add'.\n", name, clientURL)
			select {
			case err := <-done:
				return fmt.Errorf("etcd exited: %v", err)
			case <-ctx.Done():
				cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					cmd.Process.Kill()
					<-done
				}
				return nil
			}
		})}
	fs := c.Flags()
	str(fs, &name, "name", "", "this member's name, as in the cluster")
	str(fs, &data, "data-dir", "", "this member's data directory")
	str(fs, &clientURL, "client-url", "", "this member's client URL (http://HOST:2379)")
	str(fs, &peerURL, "peer-url", "", "this member's peer URL (http://HOST:2380)")
	str(fs, &others, "others", "", "the other members' client URLs, comma-separated: none may answer")
	str(fs, &bin, "etcd", "etcd", "the etcd binary")
	return c
}

// answers reports whether an etcd member serves its health endpoint at
// the client URL u (within 2 s).
func answers(ctx context.Context, u string) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", strings.TrimSuffix(u, "/")+"/health", nil)
	if err != nil {
		return false
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return true
}

// lockedWriter serializes writes from several goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
