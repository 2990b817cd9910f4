package api

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

func TestStatusRoundTrip(t *testing.T) {
	for _, c := range codes {
		wrapped := fmt.Errorf("open group x: %w", c.err)
		if got := Status(wrapped); got != c.code {
			t.Errorf("Status(%v) = %d, want %d", wrapped, got, c.code)
		}
		se := &StatusError{Code: c.code, Message: "whatever the text says, even 404 or 409"}
		if !errors.Is(se, c.err) {
			t.Errorf("StatusError %d does not match %v", c.code, c.err)
		}
		for _, o := range codes {
			if o.err != c.err && errors.Is(se, o.err) {
				t.Errorf("StatusError %d matches %v too", c.code, o.err)
			}
		}
	}
	if got := Status(errors.New("disk full")); got != http.StatusInternalServerError {
		t.Errorf("plain error: %d, want 500", got)
	}
	if errors.Is(&StatusError{Code: 500, Message: "404"}, ErrNotFound) {
		t.Error("a 500 whose text says 404 matched ErrNotFound")
	}
}

func TestKind(t *testing.T) {
	busy := Kind("a job is running", ErrConflict)
	err := fmt.Errorf("%w: failover of web", busy)
	if !errors.Is(err, busy) || !errors.Is(err, ErrConflict) || Status(err) != http.StatusConflict {
		t.Errorf("kind does not wrap its base: %v", err)
	}
	if got, want := err.Error(), "a job is running: failover of web"; got != want {
		t.Errorf("text %q, want %q", got, want)
	}
}

func TestCheckName(t *testing.T) {
	tests := []struct {
		kind, name string
		ok         bool
	}{
		{KindVM, "web", true},
		{KindVM, "web-01_a", true},
		{KindSite, "East2", true},
		{KindVM, "", false},
		{KindVM, "../409", false},
		{KindSite, "../../x", false},
		{KindVM, "-web", false},
		{KindVM, "_web", false},
		{KindVM, "web,x=y", false},
		{KindVM, "web vm", false},
		{KindVM, "web/x", false},
		{KindVM, "wéb", false},
		{KindNetwork, "a\x00b", false},
		{KindDisk, strings.Repeat("d", MaxName), true},
		{KindDisk, strings.Repeat("d", MaxName+1), false},
		{KindVM, strings.Repeat("v", MaxVMName), true},
		{KindVM, strings.Repeat("v", MaxVMName+1), false},
	}
	for _, tt := range tests {
		err := CheckName(tt.kind, tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("CheckName(%s, %q) = %v, want ok=%v", tt.kind, tt.name, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("CheckName(%s, %q) = %v, not ErrInvalid", tt.kind, tt.name, err)
		}
	}
	// Every valid VM name leaves room for its drill.
	if err := CheckName(KindGroup, strings.Repeat("v", MaxVMName)+"-drill"); err != nil {
		t.Error(err)
	}
}

func FuzzCheckName(f *testing.F) {
	for _, s := range []string{"web", "../409", "a,b", "x=y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if CheckName(KindVM, s) != nil {
			return
		}
		if strings.ContainsAny(s, "/,=.: \t\n\\%?#") {
			t.Fatalf("accepted %q", s)
		}
	})
}
