package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dr/ferry/internal/qga"
)

func TestVerifyRecords(t *testing.T) {
	var log []byte
	for i := uint64(1); i <= 10; i++ {
		log = append(log, EncodeRecord(i, int64(i))...)
	}
	tests := []struct {
		name string
		b    []byte
		want uint64
		ok   bool
	}{
		{"clean", log, 10, true},
		{"zero tail", append(append([]byte(nil), log...), make([]byte, 4096)...), 10, true},
		{"torn last", append(append([]byte(nil), log[:9*RecordSize]...), append(EncodeRecord(10, 0)[:100], make([]byte, RecordSize-100)...)...), 9, true},
		{"hole", append(append(append([]byte(nil), log[:3*RecordSize]...), make([]byte, RecordSize)...), log[4*RecordSize:]...), 3, false},
	}
	for _, tc := range tests {
		got, err := VerifyRecords(tc.b)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("%s: %d, %v; want %d ok=%v", tc.name, got, err, tc.want, tc.ok)
		}
	}
	bad := append([]byte(nil), log...)
	bad[2*RecordSize+100] ^= 1
	if _, err := VerifyRecords(bad); !errors.Is(err, ErrRecords) {
		t.Fatalf("bit flip: %v", err)
	}
}

func TestAgentProtocol(t *testing.T) {
	host, guest := net.Pipe()
	frozen := map[string]bool{}
	a := &Agent{Mounts: []string{"/data"}, MaxFreeze: 200 * time.Millisecond,
		freeze: func(m string) error { frozen[m] = true; return nil },
		thaw:   func(m string) error { frozen[m] = false; return nil }}
	go a.Serve(context.Background(), guest)
	br := bufio.NewReader(host)
	call := func(req string) map[string]any {
		t.Helper()
		host.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(host, req)
		obj, err := qga.ReadObject(br)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		json.Unmarshal(obj, &m)
		return m
	}
	// Junk and a sync byte first, as after a host reconnect.
	io.WriteString(host, "\xff{\"exec")
	host.Write([]byte{0xff})
	if r := call(`{"execute":"guest-sync-delimited","arguments":{"id":4711}}`); r["return"] != float64(4711) {
		t.Fatalf("sync: %v", r)
	}
	if r := call(`{"execute":"guest-ping"}`); r["return"] == nil {
		t.Fatalf("ping: %v", r)
	}
	if r := call(`{"execute":"guest-fsfreeze-freeze"}`); r["return"] != float64(1) || !frozen["/data"] {
		t.Fatalf("freeze: %v", r)
	}
	if r := call(`{"execute":"guest-fsfreeze-freeze"}`); r["error"] == nil {
		t.Fatalf("double freeze: %v", r)
	}
	if r := call(`{"execute":"guest-fsfreeze-status"}`); r["return"] != "frozen" {
		t.Fatalf("status: %v", r)
	}
	// The host forgets to thaw: the agent thaws by itself.
	time.Sleep(400 * time.Millisecond)
	if r := call(`{"execute":"guest-fsfreeze-status"}`); r["return"] != "thawed" || frozen["/data"] {
		t.Fatalf("auto-thaw: %v", r)
	}
	if r := call(`{"execute":"guest-nope"}`); !strings.Contains(string(mustJSON(r)), "CommandNotFound") {
		t.Fatalf("unknown: %v", r)
	}
	// guest-shutdown has no reply at all (libvirt refuses a "null" line):
	// the next thing on the wire is the ping's answer.
	host.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(host, `{"execute":"guest-shutdown"}`)
	if r := call(`{"execute":"guest-ping"}`); r == nil || r["return"] == nil {
		t.Fatalf("after guest-shutdown, the next reply is %v; want the ping's", r)
	}
}

func mustJSON(v any) []byte { b, _ := json.Marshal(v); return bytes.TrimSpace(b) }

// TestRecordPeers: a follower's records name the peer records they were
// told of, and stay valid records.
func TestRecordPeers(t *testing.T) {
	var log []byte
	peers := []uint64{0, 7, 8, 0, 1 << 40}
	for i, p := range peers {
		log = append(log, encodeRecord(uint64(i+1), time.Now().UnixNano(), p)...)
	}
	n, err := VerifyRecords(log)
	if err != nil || n != uint64(len(peers)) {
		t.Fatalf("VerifyRecords = %d, %v", n, err)
	}
	got := RecordPeers(log, n)
	if len(got) != len(peers) {
		t.Fatalf("RecordPeers = %v, want %v", got, peers)
	}
	for i := range peers {
		if got[i] != peers[i] {
			t.Fatalf("RecordPeers = %v, want %v", got, peers)
		}
	}
}
