package cli

import (
	"context"
	"errors"
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
		// Read-only: inspecting never creates, cuts or repairs.
		return journal.Open(journal.Options{Dir: dir, Logger: e.log, ReadOnly: true})
	}
	verify := &cobra.Command{Use: "verify", Short: "Check a journal, changing nothing; exit 1 if it is damaged", Args: cobra.NoArgs,
		Long: `Check every entry of a journal without changing anything. A torn tail (what a
crash leaves) is reported: the next writable open cuts it. Damage anywhere
else is reported with its segment, offset and the intact sequence ranges,
and the command exits 1: a writable open refuses such a journal rather than
drop entries.`,
		RunE: runE(e, func(ctx context.Context, args []string) error {
			j, rec, err := open()
			if err != nil {
				if errors.Is(err, journal.ErrDamaged) {
					return fmt.Errorf("journal %s is damaged: %s; nothing was changed", dir, rec.Damage)
				}
				return err
			}
			defer j.Close()
			msg := fmt.Sprintf("journal %s: %d segments, entries %d..%d, clean\n", dir, rec.Segments, rec.FirstSeq, rec.LastSeq)
			if rec.Reason != "" {
				msg = fmt.Sprintf("journal %s: %d segments, entries %d..%d, then a torn tail of %d bytes (%s) that the next writable open cuts\n",
					dir, rec.Segments, rec.FirstSeq, rec.LastSeq, rec.TruncatedBytes, rec.Reason)
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
