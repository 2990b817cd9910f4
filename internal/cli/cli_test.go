package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true}, {"64K", 64 << 10, true}, {"10M", 10 << 20, true}, {"2G", 2 << 30, true},
		{"1T", 1 << 40, true}, {"1GiB", 1 << 30, true}, {"1g", 1 << 30, true},
		{"", 0, false}, {"0", 0, false}, {"-1G", 0, false}, {"G", 0, false}, {"1X", 0, false}, {"99999999999T", 0, false},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunErrorsAndJSON(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		args    []string
		code    int
		errWant string
	}{
		{nil, 2, "Usage"},
		{[]string{"nope"}, 2, `unknown command "nope"`},
		{[]string{"serve"}, 2, "--dir is required"},
		{[]string{"serve", "--dir", dir}, 2, "--socket"},
		{[]string{"disk", "create", "--dir", dir, "vda"}, 2, "NAME SIZE"},
		{[]string{"disk", "create", "--dir", dir, "vda", "lots"}, 2, "bad size"},
	}
	for _, tc := range tests {
		code, _, stderr := run(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.errWant) {
			t.Errorf("ferry %v: exit %d, stderr %q; want %d and %q", tc.args, code, stderr, tc.code, tc.errWant)
		}
	}
	if code, _, stderr := run(t, "disk", "create", "--dir", dir, "vda", "8M"); code != 0 {
		t.Fatalf("disk create: %d %s", code, stderr)
	}
	code, out, stderr := run(t, "--output", "json", "disk", "list", "--dir", dir)
	if code != 0 {
		t.Fatalf("disk list: %d %s", code, stderr)
	}
	var specs []struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
	}
	if err := json.Unmarshal([]byte(out), &specs); err != nil || len(specs) != 1 || specs[0].Name != "vda" || specs[0].Size != 8<<20 {
		t.Fatalf("disk list json %q: %v", out, err)
	}
	if code, _, stderr := run(t, "disk", "create", "--dir", dir, "vda", "8M"); code != 1 || !strings.Contains(stderr, "already exists") {
		t.Fatalf("duplicate disk: %d %q", code, stderr)
	}
}
