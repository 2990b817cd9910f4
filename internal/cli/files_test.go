package cli

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

type entry struct {
	name, link string
	typ        byte
	body       string
}

func tarOf(t *testing.T, es ...entry) *tar.Reader {
	t.Helper()
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range es {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Linkname: e.link, Mode: 0o644, Size: int64(len(e.body))}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(e.body))
	}
	tw.Close()
	return tar.NewReader(&b)
}

func TestExtract(t *testing.T) {
	dir := t.TempDir()
	st, err := extract(tarOf(t,
		entry{name: "docs/", typ: tar.TypeDir},
		entry{name: "docs/a.txt", typ: tar.TypeReg, body: "hello"},
		entry{name: "docs/sub/", typ: tar.TypeDir},
		entry{name: "docs/sub/b.txt", typ: tar.TypeReg, body: "world!"},
		entry{name: "docs/latest", typ: tar.TypeSymlink, link: "a.txt"},
		entry{name: "docs/hard", typ: tar.TypeLink, link: "docs/a.txt"},
	), dir, false)
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 3 || st.Dirs != 2 || st.Links != 1 || st.Bytes != 11 {
		t.Errorf("stats %+v", st)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "docs", "latest")); string(b) != "hello" {
		t.Errorf("through the symlink: %q", b)
	}
	// Again: nothing is overwritten without asking.
	if _, err := extract(tarOf(t, entry{name: "docs/a.txt", typ: tar.TypeReg, body: "new"}), dir, false); err == nil {
		t.Error("an existing file was overwritten without --overwrite")
	}
	if _, err := extract(tarOf(t, entry{name: "docs/a.txt", typ: tar.TypeReg, body: "new"}), dir, true); err != nil {
		t.Errorf("--overwrite: %v", err)
	}
}

func TestExtractRefusesEscapes(t *testing.T) {
	tests := []struct {
		name string
		es   []entry
	}{
		{"absolute", []entry{{name: "/etc/passwd", typ: tar.TypeReg, body: "x"}}},
		{"dot-dot", []entry{{name: "../x", typ: tar.TypeReg, body: "x"}}},
		{"inner dot-dot", []entry{{name: "a/../../x", typ: tar.TypeReg, body: "x"}}},
		{"through a symlink", []entry{{name: "l", typ: tar.TypeSymlink, link: "/tmp"}, {name: "l/x", typ: tar.TypeReg, body: "x"}}},
		{"hard link out", []entry{{name: "h", typ: tar.TypeLink, link: "../../etc/passwd"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			_, err := extract(tarOf(t, tt.es...), dir, false)
			if !errors.Is(err, errOutside) {
				t.Errorf("extract: %v, want errOutside", err)
			}
		})
	}
}
