package agent

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/ferry-dr/ferry/internal/nbd"
)

// socketAccess resolves the NBD socket's group and checks that its
// members can reach the socket at all: every directory above it must let
// them through (x for the group or for others). A hypervisor that cannot
// would fail much later, at a VM's start, with "Permission denied"; this
// says which directory to open instead.
func socketAccess(group string, mode os.FileMode, sock string) (nbd.SocketAccess, error) {
	if group == "" {
		if mode != 0 {
			return nbd.SocketAccess{}, fmt.Errorf("%w: an NBD socket mode (%v) without a group (--nbd-group)", ErrInvalid, mode)
		}
		return nbd.SocketAccess{}, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return nbd.SocketAccess{}, fmt.Errorf("%w: NBD socket group: %v", ErrInvalid, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return nbd.SocketAccess{}, fmt.Errorf("%w: group %q has gid %q", ErrInvalid, group, g.Gid)
	}
	abs, err := filepath.Abs(sock)
	if err != nil {
		return nbd.SocketAccess{}, err
	}
	for d := filepath.Dir(abs); ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return nbd.SocketAccess{}, err
		}
		st := fi.Sys().(*syscall.Stat_t)
		through := fi.Mode()&0o001 != 0 || int(st.Gid) == gid && fi.Mode()&0o010 != 0
		if !through {
			return nbd.SocketAccess{}, fmt.Errorf("%w: group %s cannot reach the NBD socket %s: directory %s is %v; run 'chmod o+x %s' (or give it to the group with g+x)",
				ErrInvalid, group, abs, d, fi.Mode().Perm(), d)
		}
		if d == "/" {
			break
		}
	}
	return nbd.SocketAccess{GID: gid, Mode: mode}, nil
}
