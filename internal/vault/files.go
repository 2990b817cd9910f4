package vault

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/ferry-dr/ferry/internal/api"
)

// This file: files from a recovery point, read at the recovery site
// (the agent's libguestfs session) and passed through.

// Files lists path ("/": the file systems) of a protection's disks at a
// recovery point (any the failover takes: latest-processed by default,
// last-clean, a point id, a time).
func (v *Vault) Files(ctx context.Context, vm, point, path string) (api.FileListing, error) {
	pt, c, err := v.filesPoint(ctx, vm, point)
	if err != nil {
		return api.FileListing{}, err
	}
	l, err := c.Files(ctx, vm, pt.Seq, cmp.Or(path, "/"))
	if err != nil {
		return l, passSiteError(err)
	}
	l.Point = pt
	return l, nil
}

// FileContent opens a download of path at a point (raw: a regular
// file's bytes; else a tar of it under its base name). The caller closes
// the body.
func (v *Vault) FileContent(ctx context.Context, vm, point, path string, raw bool) (*http.Response, api.Point, error) {
	pt, c, err := v.filesPoint(ctx, vm, point)
	if err != nil {
		return nil, pt, err
	}
	resp, err := c.FileContent(ctx, vm, pt.Seq, path, raw)
	if err != nil {
		return nil, pt, passSiteError(err)
	}
	return resp, pt, nil
}

func (v *Vault) filesPoint(ctx context.Context, vm, point string) (api.Point, Site, error) {
	p, err := v.Protection(ctx, vm)
	if err != nil {
		return api.Point{}, nil, err
	}
	_, c, err := v.site(ctx, p.Target)
	if err != nil {
		return api.Point{}, nil, err
	}
	pt, err := v.failoverPoint(ctx, p, cmp.Or(point, "latest-processed"))
	return pt, c, err
}

// passSiteError lets the recovery site's answers about the files
// themselves (no such path, a file system it cannot read, too many
// sessions, a bad path) through as the vault's own; anything else stays
// the site's failure (502).
func passSiteError(err error) error {
	var se *api.StatusError
	if !errors.As(err, &se) {
		return err
	}
	for _, s := range []error{api.ErrNotFound, api.ErrUnsupported, api.ErrTooMany, api.ErrInvalid} {
		if errors.Is(err, s) {
			return fmt.Errorf("%w: %s", s, se.Message)
		}
	}
	return err
}
