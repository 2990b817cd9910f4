// Command ferry is the single binary for every ferry role: site agent,
// vault, CLI. All logic lives under internal/; this file only hands over.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-dr/ferry/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
