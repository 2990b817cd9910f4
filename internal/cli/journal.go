package cli

import (
	"context"
	"fmt"
	"strings"

	"github.com/ferry-dr/ferry/internal/journal"
	"github.com/spf13/cobra"
)

type entryJSON struct {
	Seq    uint64 `json:"seq"`
	Time   int64  `json:"time_unix_nano"`
	Kind   string `json:"kind"`
	Disk   uint16 `json:"disk"`
	Offset uint64 `json:"offset"`
	Length uint32 `json:"length"`
	Marker string `json:"marker,omitempty"`
}

func journalCmd(e *env) *cobra.Command {
	var dir string
	var from uint64
	var limit int
	open := func() (*journal.Journal, journal.Recovery, error) {
		if dir == "" {
			return nil, journal.Recovery{}, usagef("--dir is required")
		}
		// Opening recovers a torn tail: that is what verify reports.
		return journal.Open(journal.Options{Dir: dir, Logger: e.log})
	}
	verify := &cobra.Command{Use: "verify", Short: "Check a journal (and cut a torn tail, as a restart would)", Args: cobra.NoArgs,
		RunE: runE(e, func(ctx context.Context, args []string) error {
			j, rec, err := open()
			if err != nil {
				return err
			}
			defer j.Close()
			msg := fmt.Sprintf("journal %s: %d segments, entries %d..%d, clean\n", dir, rec.Segments, rec.FirstSeq, rec.LastSeq)
			if rec.Reason != "" {
				msg = fmt.Sprintf("journal %s: tail cut (%s): %d bytes, %d files dropped; now entries %d..%d\n",
					dir, rec.Reason, rec.TruncatedBytes, rec.DroppedFiles, rec.FirstSeq, rec.LastSeq)
			}
			return e.print(rec, msg)
		})}
	dump := &cobra.Command{Use: "dump", Short: "Print a journal's entries", Args: cobra.NoArgs,
		Example: "  ferry journal dump --dir vm1/journal --from 1000 --limit 20",
		RunE: runE(e, func(ctx context.Context, args []string) error {
			j, _, err := open()
			if err != nil {
				return err
			}
			defer j.Close()
			start := max(from, j.FirstSeq())
			r, err := j.NewReader(start)
			if err != nil {
				return err
			}
			defer r.Close()
			var out []entryJSON
			var b strings.Builder
			for n := 0; limit == 0 || n < limit; n++ {
				en, ok, err := r.TryNext()
				if err != nil {
					return err
				}
				if !ok {
					break
				}
				x := entryJSON{Seq: en.Seq, Time: en.Time, Kind: en.Kind.String(), Disk: en.Disk, Offset: en.Offset, Length: en.Length}
				if en.Kind == journal.KindMarker {
					x.Marker = string(en.Data)
				}
				out = append(out, x)
				fmt.Fprintf(&b, "%8d %-6s disk=%d off=%d len=%d %s\n", x.Seq, x.Kind, x.Disk, x.Offset, x.Length, x.Marker)
			}
			return e.print(out, b.String())
		})}
	dump.Flags().Uint64Var(&from, "from", 0, "first sequence number to dump (default: oldest kept)")
	dump.Flags().IntVar(&limit, "limit", 0, "dump at most this many entries (0: all)")
	c := group("journal", "Inspect a journal (dump, verify)", dump, verify)
	str(c.PersistentFlags(), &dir, "dir", "", "journal directory (a group's journal/ subdirectory)")
	return c
}
