package api

import "time"

// This file: restoring files from a recovery point (GET .../files).

// File types in a FileInfo.
const (
	FileDir        = "dir"
	FileRegular    = "file"
	FileSymlink    = "symlink"
	FileOther      = "other"
	FileFilesystem = "filesystem" // an entry of the root: one file system
)

// FileInfo is one entry of a listing of a recovery point's files.
type FileInfo struct {
	Name  string    `json:"name"`
	Type  string    `json:"type"`
	Size  int64     `json:"size"`
	Mode  uint32    `json:"mode"`
	MTime time.Time `json:"mtime,omitzero"`
	Link  string    `json:"link,omitempty"` // a symlink's target
	// For a file system at the root: its type, its device in the VM's
	// disks ("vdb", "vda1") and, if ferry cannot read it, why.
	FSType      string `json:"fs_type,omitempty"`
	Device      string `json:"device,omitempty"`
	Unsupported string `json:"unsupported,omitempty"`
}

// FileListing is a directory of a recovery point: the root ("/") lists
// the file systems of the VM's disks, each a directory of its own.
type FileListing struct {
	Point   Point      `json:"point"`
	Path    string     `json:"path"`
	Entries []FileInfo `json:"entries"`
}

// FileSizeHeader, on a file download, is the bytes it will carry (a
// tree's: the space its files use, an estimate for progress).
const FileSizeHeader = "Ferry-Size"

// FilePointHeader, on a download from the vault, is the sequence number
// of the recovery point the files come from.
const FilePointHeader = "Ferry-Point"
