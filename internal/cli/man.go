package cli

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// manCmd writes a man page per command into a directory (make man).
func manCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{Use: "man DIR", Short: "Write the man pages (ferry.1, ferry-failover.1, ...) into DIR", Args: cobra.ExactArgs(1),
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return ranErr{err}
			}
			root.DisableAutoGenTag = true
			hdr := &doc.GenManHeader{Title: "FERRY", Section: "1", Source: "ferry " + Version, Manual: "ferry manual"}
			if err := doc.GenManTree(root, hdr, args[0]); err != nil {
				return ranErr{fmt.Errorf("write man pages: %w", err)}
			}
			return nil
		}}
}
