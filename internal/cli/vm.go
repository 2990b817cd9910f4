package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/vaultclient"
	"github.com/spf13/cobra"
)

func vmCmd(e *env) *cobra.Command {
	var od, os_, ost, odel, ol, oc vaultOpts
	var site, kernel, initrd, appendLine, fwd, network, firmware string
	var disks, nics []string
	var mem, vcpus, port int
	var qga bool
	var shutdownTimeout time.Duration
	define := vaultCommand(e, &cobra.Command{Use: "define NAME", Short: "Define a VM at a site and create its disks there", Args: cobra.ExactArgs(1),
		Example: "  ferry vm define web --site east --disk vda=10G --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0'\n" +
			"  ferry vm define web --site east --disk vda=10G --forward east=127.0.0.1:8081,west=127.0.0.1:8082\n" +
			"  ferry vm define db --site east --disk vda=10G --disk vdb=50G --nic nic0=prod-east --nic nic1=backend-east"}, &od,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			name := args[0]
			vm := api.VM{Name: name, Site: site, MemoryMiB: mem, VCPUs: vcpus, Kernel: kernel, Initrd: initrd, Append: appendLine,
				GuestPort: port, QGA: qga, Forwards: map[string]string{}, ShutdownTimeout: shutdownTimeout, Firmware: firmware}
			if network != "" && len(nics) > 0 {
				return usagef("--network names the one NIC's network; with --nic, name every NIC's (--nic nic0=%s)", network)
			}
			if network != "" {
				vm.NICs = []api.NIC{{Name: "nic0", Network: network}}
			}
			for _, n := range nics {
				name, net, ok := strings.Cut(n, "=")
				if !ok || name == "" || net == "" {
					return usagef("--nic wants NAME=NETWORK (like nic1=backend), got %q", n)
				}
				vm.NICs = append(vm.NICs, api.NIC{Name: name, Network: net})
			}
			for _, d := range disks {
				n, sz, ok := strings.Cut(d, "=")
				size, err := parseSize(sz)
				if !ok || err != nil {
					return usagef("--disk wants NAME=SIZE, got %q", d)
				}
				vm.Disks = append(vm.Disks, api.VMDisk{Name: n, Size: size})
			}
			if fwd != "" {
				for _, f := range strings.Split(fwd, ",") {
					site, addr, ok := strings.Cut(f, "=")
					if !ok {
						return usagef("--forward wants SITE=HOST:PORT, got %q", f)
					}
					vm.Forwards[site] = addr // SITE or SITE/NETWORK
				}
			}
			out, err := vc.DefineVM(ctx, vm)
			if err != nil {
				return err
			}
			return e.print(out, fmt.Sprintf("VM %s defined at %s; its disks are NBD exports %s/DISK there; start it with 'ferry vm start %s'\n", name, site, name, name))
		})
	fs := define.Flags()
	str(fs, &site, "site", "", "site where the VM runs (required)")
	fs.StringArrayVar(&disks, "disk", nil, "disk NAME=SIZE (repeatable; at least one)")
	fs.IntVar(&mem, "memory", 256, "memory in MiB")
	fs.IntVar(&vcpus, "vcpus", 1, "virtual CPUs")
	str(fs, &kernel, "kernel", "", "kernel to boot (default: boot from the first disk)")
	str(fs, &initrd, "initrd", "", "initrd")
	str(fs, &appendLine, "append", "", "kernel command line")
	str(fs, &firmware, "firmware", "bios", "firmware: bios (SeaBIOS) or uefi (OVMF, its variables kept per VM)")
	str(fs, &network, "network", "", "network of the VM's NIC at its site (default: the site's first production network)")
	fs.StringArrayVar(&nics, "nic", nil, "NAME=NETWORK: a NIC on a network of its site, in the order the guest sees them (repeatable; the forwards reach the first)")
	str(fs, &fwd, "forward", "", "SITE=HOST:PORT,... host address per site that reaches the guest port on its production network; SITE/NETWORK=HOST:PORT for another network")
	fs.IntVar(&port, "guest-port", 80, "guest port the forwards reach")
	fs.BoolVar(&qga, "qga", true, "guest agent channel (application-consistent points, guest-shutdown)")
	fs.DurationVar(&shutdownTimeout, "shutdown-timeout", 0, "bound a graceful shutdown (guest agent, ACPI, then quit); default 60s")
	define.MarkFlagRequired("site")
	define.MarkFlagRequired("disk")

	start := vaultCommand(e, &cobra.Command{Use: "start NAME", Short: "Start a defined VM where it is", Args: cobra.ExactArgs(1)}, &os_,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			st, err := vc.StartVM(ctx, args[0])
			if err != nil {
				return err
			}
			if st.Console == "" && st.Reason != "" { // a consistency group: what each VM did
				return e.print(st, fmt.Sprintf("group %s %s: %s\n", args[0], st.State, st.Reason))
			}
			return e.print(st, fmt.Sprintf("VM %s %s (%s); console %s\n", args[0], st.State, st.Accel, st.Console))
		})
	stop := vaultCommand(e, &cobra.Command{Use: "stop NAME", Short: "Shut a VM down gracefully where it runs", Args: cobra.ExactArgs(1)}, &ost,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			steps, err := vc.StopVM(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(steps, fmt.Sprintf("VM %s stopped:\n  %s\n", args[0], strings.Join(steps.Steps, "\n  ")))
		})
	del := vaultCommand(e, &cobra.Command{Use: "delete NAME", Short: "Delete a stopped, unprotected VM and its disks", Args: cobra.ExactArgs(1)}, &odel,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			if err := vc.DeleteVM(ctx, args[0]); err != nil {
				return err
			}
			return e.print(map[string]string{"deleted": args[0]}, fmt.Sprintf("VM %s and its disks deleted\n", args[0]))
		})
	list := vaultCommand(e, &cobra.Command{Use: "list", Aliases: []string{"ls"}, Short: "List VMs", Args: cobra.NoArgs}, &ol,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			vms, err := vc.VMs(ctx)
			if err != nil {
				return err
			}
			return e.print(vms, table("VM\tSITE\tMEMORY\tDISKS", func(tw io.Writer) {
				for _, v := range vms {
					fmt.Fprintf(tw, "%s\t%s\t%d MiB\t%d\n", v.Name, v.Site, v.MemoryMiB, len(v.Disks))
				}
			}))
		})
	var follow, test bool
	console := vaultCommand(e, &cobra.Command{Use: "console NAME", Short: "Print a VM's serial console, wherever it runs", Args: cobra.ExactArgs(1),
		Example: "  ferry vm console web --follow\n  ferry vm console web --test"}, &oc,
		func(ctx context.Context, vc *vaultclient.Client, args []string) error {
			var off int64
			read := vc.Console
			if test {
				read = vc.TestConsole
			}
			for {
				out, err := read(ctx, args[0], off)
				if err != nil {
					return err
				}
				fmt.Fprint(e.stdout, out.Data)
				off = out.Next
				if !follow {
					return nil
				}
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(500 * time.Millisecond):
				}
			}
		})
	console.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing the console as it grows")
	console.Flags().BoolVar(&test, "test", false, "the console of the VM's test failover (drill) at its recovery site")
	return group("vm", "Define, import, start, stop, delete and list VMs", define, vmImportCmd(e), start, stop, del, list, console, vmReleaseCmd(e))
}
