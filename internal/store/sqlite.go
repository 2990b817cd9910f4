package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	_ "modernc.org/sqlite" // pure Go SQLite driver
)

// SQLite is a Store in one SQLite file (WAL mode, synchronous=FULL).
type SQLite struct {
	db *sql.DB
}

var _ Store = (*SQLite)(nil)

// OpenSQLite opens (creating if needed) the store at path.
func OpenSQLite(path string) (*SQLite, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(5000)")
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	db.SetMaxOpenConns(1) // one writer; SQLite serializes anyway
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS docs (
		kind TEXT NOT NULL, id TEXT NOT NULL, data BLOB NOT NULL, version INTEGER NOT NULL,
		PRIMARY KEY (kind, id))`); err != nil {
		db.Close()
		return nil, fmt.Errorf("create store schema: %w", err)
	}
	return &SQLite{db: db}, nil
}

// Get implements Store.
func (s *SQLite) Get(ctx context.Context, kind, id string) (Doc, error) {
	d := Doc{Kind: kind, ID: id}
	err := s.db.QueryRowContext(ctx, `SELECT data, version FROM docs WHERE kind = ? AND id = ?`, kind, id).Scan(&d.Data, &d.Version)
	if errors.Is(err, sql.ErrNoRows) {
		return Doc{}, fmt.Errorf("%w: %s %q", ErrNotFound, kind, id)
	}
	if err != nil {
		return Doc{}, fmt.Errorf("store get %s %q: %w", kind, id, err)
	}
	return d, nil
}

// List implements Store.
func (s *SQLite) List(ctx context.Context, kind string) ([]Doc, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, data, version FROM docs WHERE kind = ? ORDER BY id`, kind)
	if err != nil {
		return nil, fmt.Errorf("store list %s: %w", kind, err)
	}
	defer rows.Close()
	var out []Doc
	for rows.Next() {
		d := Doc{Kind: kind}
		if err := rows.Scan(&d.ID, &d.Data, &d.Version); err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// Put implements Store.
func (s *SQLite) Put(ctx context.Context, kind, id string, data []byte, version int64) (int64, error) {
	var res sql.Result
	var err error
	if version == 0 {
		res, err = s.db.ExecContext(ctx, `INSERT INTO docs (kind, id, data, version) VALUES (?, ?, ?, 1) ON CONFLICT DO NOTHING`, kind, id, data)
	} else {
		res, err = s.db.ExecContext(ctx, `UPDATE docs SET data = ?, version = version + 1 WHERE kind = ? AND id = ? AND version = ?`, data, kind, id, version)
	}
	if err != nil {
		return 0, fmt.Errorf("store put %s %q: %w", kind, id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return 0, fmt.Errorf("%w: %s %q is not at version %d", ErrConflict, kind, id, version)
	}
	return version + 1, nil
}

// Delete implements Store.
func (s *SQLite) Delete(ctx context.Context, kind, id string, version int64) error {
	res, err := s.db.ExecContext(ctx, `DELETE FROM docs WHERE kind = ? AND id = ? AND version = ?`, kind, id, version)
	if err != nil {
		return fmt.Errorf("store delete %s %q: %w", kind, id, err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		if _, err := s.Get(ctx, kind, id); errors.Is(err, ErrNotFound) {
			return err
		}
		return fmt.Errorf("%w: %s %q is not at version %d", ErrConflict, kind, id, version)
	}
	return nil
}

// Close implements Store.
func (s *SQLite) Close() error { return s.db.Close() }
