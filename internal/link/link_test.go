package link

import (
	"bytes"
	"errors"
	"net"
	"testing"

	"github.com/ferry-dr/ferry/internal/journal"
)

func TestFrames(t *testing.T) {
	a, b := net.Pipe()
	ca, cb := New(a), New(b)
	go func() {
		ca.WriteJSON(TypeHello, Hello{Group: "vm1", Source: "siteA"})
		e := journal.Entry{Seq: 5, Kind: journal.KindWrite, Length: 3, Data: []byte("abc")}
		ca.Write(TypeEntries, journal.AppendEntry(nil, &e))
		ca.Write(TypeBaseData, EncodeBaseData(2, 4096), []byte("xyz"))
		ca.Write(TypeError, []byte("boom"))
	}()
	var h Hello
	if err := cb.ReadJSON(TypeHello, &h); err != nil || h.Group != "vm1" {
		t.Fatalf("hello %+v %v", h, err)
	}
	typ, body, err := cb.Read()
	if err != nil || typ != TypeEntries {
		t.Fatal(typ, err)
	}
	es, err := DecodeEntries(body, nil)
	if err != nil || len(es) != 1 || es[0].Seq != 5 || string(es[0].Data) != "abc" {
		t.Fatalf("entries %+v %v", es, err)
	}
	typ, body, _ = cb.Read()
	id, off, data, err := DecodeBaseData(body)
	if typ != TypeBaseData || err != nil || id != 2 || off != 4096 || string(data) != "xyz" {
		t.Fatalf("base data %d %d %q %v", id, off, data, err)
	}
	if _, _, err := cb.Read(); err == nil || !bytes.Contains([]byte(err.Error()), []byte("boom")) {
		t.Fatalf("error frame: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	e := journal.Entry{Seq: 1, Kind: journal.KindWrite, Length: 2, Data: []byte("hi")}
	f.Add(byte(TypeEntries), journal.AppendEntry(nil, &e))
	f.Add(byte(TypeBaseData), append(EncodeBaseData(1, 512), 1, 2, 3))
	f.Add(byte(TypeAck), EncodeAck(9))
	f.Fuzz(func(t *testing.T, typ byte, b []byte) {
		switch typ % 3 {
		case 0:
			es, err := DecodeEntries(b, nil)
			if err != nil && !errors.Is(err, ErrFrame) {
				t.Fatal(err)
			}
			for _, e := range es {
				if e.Kind == journal.KindWrite && int(e.Length) != len(e.Data) {
					t.Fatal("write entry with a wrong payload accepted")
				}
			}
		case 1:
			if _, off, _, err := DecodeBaseData(b); err == nil && off < 0 {
				t.Fatal("negative offset accepted")
			}
		case 2:
			DecodeAck(b)
		}
	})
}
