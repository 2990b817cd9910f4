package replica

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"
	"time"
)

func TestPrune(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var pts []Point
	// A point every 10 minutes for 3 days, plus one app-consistent point.
	for i := 0; i < 3*24*6; i++ {
		pts = append(pts, Point{Seq: uint64(i + 1), Time: now.Add(-72*time.Hour + time.Duration(i)*10*time.Minute), Type: "crash"})
	}
	pts[5].Type = "app"
	got := Prune(pts, now, Policy{})
	var recent, hourly, sparse, app int
	for _, p := range got {
		age := now.Sub(p.Time)
		switch {
		case p.Type == "app":
			app++
		case age < 2*time.Hour:
			recent++
		case age < 24*time.Hour:
			hourly++
		default:
			sparse++
		}
	}
	if recent != 11 || app != 1 { // ages 10..110 min
		t.Fatalf("recent %d (want all 11), app %d", recent, app)
	}
	if hourly < 21 || hourly > 23 {
		t.Fatalf("hourly %d, want about 22", hourly)
	}
	if sparse < 11 || sparse > 13 {
		t.Fatalf("sparse %d, want about 12 (48 h / 4 h)", sparse)
	}
	for i := 1; i < len(got); i++ {
		if got[i].Seq <= got[i-1].Seq {
			t.Fatal("not in order")
		}
	}
}

func TestFoldKeepsViewsRight(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	g, rep, start := emptyPair(t, 64<<10)
	randomOps(t, g, rng, 120)
	src := g.Journal()
	ship(t, src, start, rep)
	zero := map[uint16][]byte{1: make([]byte, diskSize), 2: make([]byte, diskSize)}
	pts := rep.Points()
	early, mid := pts[1].Seq, pts[len(pts)/2].Seq

	held, err := rep.OpenView("a", early, "")
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := rep.Fold(context.Background(), mid); got != early {
		t.Fatalf("fold with a view open at %d went to %d", early, got)
	}
	held.Close()
	if got, err := rep.Fold(context.Background(), mid); err != nil || got != mid {
		t.Fatalf("fold to %d: %d, %v", mid, got, err)
	}
	if _, err := rep.OpenView("a", early, ""); err == nil {
		t.Fatal("view before the folded point opened")
	}
	check := func(rep *Replica) {
		for _, p := range rep.Points() {
			if p.Seq < mid {
				t.Fatalf("point %d listed below the folded %d", p.Seq, mid)
			}
			want := replay(t, src, start, p.Seq, zero)
			for _, s := range g.Disks() {
				if got := readView(t, rep, s.Name, p.Seq); !bytes.Equal(got, want[s.ID]) {
					t.Fatalf("after fold: view of %s at %d differs", s.Name, p.Seq)
				}
			}
		}
	}
	check(rep)
	rep.Close()
	rep2, err := Open(Config{Dir: rep.cfg.Dir, SegmentSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer rep2.Close()
	if st := rep2.Status(); st.FoldedSeq != mid {
		t.Fatalf("folded seq after reopen %d, want %d", st.FoldedSeq, mid)
	}
	check(rep2)
}
