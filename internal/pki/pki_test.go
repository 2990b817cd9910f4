package pki

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"
)

func TestMutualTLS(t *testing.T) {
	now := time.Now()
	ca, other := t.TempDir(), t.TempDir()
	if err := InitCA(ca, "test CA", now); err != nil {
		t.Fatal(err)
	}
	if err := InitCA(ca, "again", now); err == nil {
		t.Fatal("second InitCA overwrote the CA")
	}
	if err := InitCA(other, "other CA", now); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"siteA", "siteB"} {
		if err := Issue(ca, ca, Peer{Role: RoleSite, Name: n}, []string{"127.0.0.1", "localhost"}, now); err != nil {
			t.Fatal(err)
		}
	}
	if err := Issue(other, other, Peer{Role: RoleSite, Name: "intruder"}, []string{"127.0.0.1"}, now); err != nil {
		t.Fatal(err)
	}
	a, _ := Load(ca, "siteA")
	b, _ := Load(ca, "siteB")
	x, _ := Load(other, "intruder")

	ln, err := tls.Listen("tcp", "127.0.0.1:0", a.ServerConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if err := c.(*tls.Conn).Handshake(); err == nil {
					c.Write([]byte("hi"))
				}
			}()
		}
	}()
	dial := func(id *Identity) error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), id.ClientConfig(Peer{Role: RoleSite, Name: "siteA"}))
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 2)
		_, err = io.ReadFull(c, b)
		return err
	}
	if err := dial(b); err != nil {
		t.Fatalf("trusted peer refused: %v", err)
	}
	if err := dial(x); err == nil {
		t.Fatal("peer with a certificate from another CA was accepted")
	}
	if state := tls.VersionTLS13; a.ServerConfig().MinVersion != uint16(state) {
		t.Fatal("not TLS 1.3")
	}
}
