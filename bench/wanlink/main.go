// Command wanlink joins two network namespaces by a link that delays and
// drops packets (internal/faultnet.Link), for bench/wan.sh:
//
//	wanlink -a wanE -b wanW -delay 20ms -loss 0.01
//
// It creates the two TUN devices, prints "ready", and forwards until
// killed; the caller moves each device into its namespace and configures
// it (addresses, tc tbf for the rate).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-dr/ferry/internal/faultnet"
)

func main() {
	a := flag.String("a", "wanA", "first TUN device")
	b := flag.String("b", "wanB", "second TUN device")
	delay := flag.Duration("delay", 0, "one-way delay")
	loss := flag.Float64("loss", 0, "packet loss probability each way (0..1)")
	flag.Parse()
	l, err := faultnet.NewLink(*a, *b, *delay, *loss)
	if err != nil {
		fmt.Fprintln(os.Stderr, "wanlink:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Println("ready")
	l.Run(ctx)
	fmt.Fprintf(os.Stderr, "wanlink: forwarded %d packets (%d bytes), dropped %d\n", l.Forwarded.Load(), l.Bytes.Load(), l.Dropped.Load())
}
