package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
)

// vmImportCmd is ferry vm import --libvirt DOMAIN --site S: it starts the
// import at the site and follows it with a progress bar until the VM is
// defined.
func vmImportCmd(e *env) *cobra.Command {
	var o vaultOpts
	var site, domain, fwd string
	var port int
	c := vaultCommand(e, &cobra.Command{Use: "import", Short: "Import a shut-off libvirt domain: copy its disks into ferry, run it on them", Args: cobra.NoArgs,
		Example: "  virsh shutdown web   # an offline import: the domain must be shut off\n" +
			"  ferry vm import --libvirt web --site east\n" +
			"  ferry protect web --to west --wait"}, &o,
		func(ctx context.Context, vc *vaultclient.Client, _ []string) error {
			if domain == "" || site == "" {
				return usagef("--libvirt DOMAIN and --site SITE are required")
			}
			req := api.VaultImport{Site: site, Domain: domain, Forwards: map[string]string{}, GuestPort: port}
			if fwd != "" {
				for _, f := range strings.Split(fwd, ",") {
					s, addr, ok := strings.Cut(f, "=")
					if !ok {
						return usagef("--forward wants SITE=HOST:PORT, got %q", f)
					}
					req.Forwards[s] = addr
				}
			}
			st, err := vc.ImportVM(ctx, req)
			if err != nil {
				return err
			}
			var b *progressbar.ProgressBar
			if !e.json() && isTerminal(e.stderr) {
				b = progressbar.NewOptions64(max(st.TotalBytes, 1), progressbar.OptionSetWriter(e.stderr), progressbar.OptionSetDescription("copying "+domain),
					progressbar.OptionShowBytes(true), progressbar.OptionSetWidth(30), progressbar.OptionOnCompletion(func() { fmt.Fprintln(e.stderr) }))
			}
			for st.State == api.ImportCopying {
				if b != nil {
					b.Set64(st.DoneBytes)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("stopped following the import of %s (it goes on at %s; see 'ferry vm list'): %w", domain, site, ctx.Err())
				case <-time.After(300 * time.Millisecond):
				}
				if st, err = vc.ImportStatus(ctx, site, domain); err != nil {
					return err
				}
			}
			if b != nil {
				b.Finish()
			}
			if st.State == api.ImportFailed {
				return fmt.Errorf("import of %s at %s failed: %s (fix it and run the import again: a partial import is redone)", domain, site, st.Error)
			}
			res := st.Result
			var lines []string
			for _, d := range res.Disks {
				lines = append(lines, fmt.Sprintf("  %s from %s (%s): %d bytes, %d of data copied", d.Name, d.Source, d.Format, d.Size, d.Copied))
			}
			return e.print(st, fmt.Sprintf("domain %s imported at %s in %.1fs; it now runs on ferry's disks (its own are untouched):\n%s\n"+
				"start it with 'ferry vm start %s', protect it with 'ferry protect %s --to SITE'; 'ferry vm release %s' gives it its own disks back\n",
				domain, site, res.Seconds, strings.Join(lines, "\n"), domain, domain, domain))
		})
	str(c.Flags(), &domain, "libvirt", "", "name of the libvirt domain to import (shut off)")
	str(c.Flags(), &site, "site", "", "site whose libvirt runs the domain (its agent runs with --runtime libvirt)")
	str(c.Flags(), &fwd, "forward", "", "SITE=HOST:PORT,... host address per site that reaches the guest port (ferry's user-mode NIC then replaces the domain's user-mode ones)")
	c.Flags().IntVar(&port, "guest-port", 80, "guest port the forwards reach")
	return c
}

// vmReleaseCmd is ferry vm release NAME.
func vmReleaseCmd(e *env) *cobra.Command {
	var o vaultOpts
	return vaultCommand(e, &cobra.Command{Use: "release NAME", Short: "Give an imported VM back to libvirt with its own disks (as they were at the import)", Args: cobra.ExactArgs(1)}, &o,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.ReleaseVM(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"released": args[0]}, fmt.Sprintf("domain %s runs on its own disks again (as they were at the import); ferry's copy, with what it wrote since, stays in the site's group %s\n", args[0], args[0]))
		})
}
