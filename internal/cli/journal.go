package cli

import (
	"context"
	"fmt"
	"strings"

	"github.com/ferry-dr/ferry/internal/journal"
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

func runJournal(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: journal dump|verify", errUsage)
	}
	fs := newFlags("journal "+args[0], e)
	dir := fs.String("dir", "", "journal directory (a group's journal/ subdirectory)")
	from := fs.Uint64("from", 0, "first sequence number to dump (default: oldest kept)")
	limit := fs.Int("limit", 0, "dump at most this many entries (0: all)")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	if *dir == "" {
		return fmt.Errorf("%w: --dir is required", errUsage)
	}
	// Opening recovers a torn tail: that is what verify reports.
	j, rec, err := journal.Open(journal.Options{Dir: *dir, Logger: e.log})
	if err != nil {
		return err
	}
	defer j.Close()
	switch args[0] {
	case "verify":
		msg := fmt.Sprintf("journal %s: %d segments, entries %d..%d, clean\n", *dir, rec.Segments, rec.FirstSeq, rec.LastSeq)
		if rec.Reason != "" {
			msg = fmt.Sprintf("journal %s: tail cut (%s): %d bytes, %d files dropped; now entries %d..%d\n",
				*dir, rec.Reason, rec.TruncatedBytes, rec.DroppedFiles, rec.FirstSeq, rec.LastSeq)
		}
		return e.print(rec, msg)
	case "dump":
		start := max(*from, j.FirstSeq())
		r, err := j.NewReader(start)
		if err != nil {
			return err
		}
		defer r.Close()
		var out []entryJSON
		var b strings.Builder
		for n := 0; *limit == 0 || n < *limit; n++ {
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
	}
	return fmt.Errorf("%w: unknown journal subcommand %q", errUsage, args[0])
}
