package httpserver

import (
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestStreamOutlastsWriteTimeout: an answer written for longer than the
// server's WriteTimeout arrives whole through Stream, and is cut short
// without it.
func TestStreamOutlastsWriteTimeout(t *testing.T) {
	tests := []struct {
		name   string
		stream bool
		whole  bool
	}{
		{"plain writes", false, false},
		{"through Stream", true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := New(Config{WriteTimeout: 300 * time.Millisecond, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				out := io.Writer(w)
				if tt.stream {
					out = Stream(w, 300*time.Millisecond)
				}
				for range 8 {
					if _, err := out.Write(make([]byte, 1024)); err != nil {
						return
					}
					w.(http.Flusher).Flush()
					time.Sleep(100 * time.Millisecond)
				}
			})})
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go srv.Serve(ln)
			t.Cleanup(func() { srv.Close() })
			resp, err := http.Get("http://" + ln.Addr().String() + "/")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if whole := err == nil && len(b) == 8*1024; whole != tt.whole {
				t.Errorf("got %d bytes (%v), whole=%v; want whole=%v", len(b), err, whole, tt.whole)
			}
		})
	}
}
