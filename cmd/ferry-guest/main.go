// Command ferry-guest runs inside ferry's test guest: "ferry-guest agent"
// speaks the QEMU guest agent protocol subset ferry uses, "ferry-guest
// workload" writes sequence-stamped records and serves its state over HTTP.
// Built static (CGO_ENABLED=0) into the guest's initramfs.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-dr/ferry/internal/guest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ferry-guest agent|workload [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "agent":
		err = guest.RunAgent(ctx, os.Args[2:])
	case "workload":
		err = guest.RunWorkload(ctx, os.Args[2:])
	case "powerwatch":
		err = guest.RunPowerWatch(ctx)
	case "probe":
		err = guest.Probe(os.Args[2:])
	case "docs":
		err = guest.CheckDocs(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferry-guest:", err)
		os.Exit(1)
	}
}
