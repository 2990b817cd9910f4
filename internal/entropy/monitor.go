package entropy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
	"github.com/ferry-dr/ferry/internal/journal"
)

// Policy is the detector's thresholds (api.RansomwarePolicy).
type Policy = api.RansomwarePolicy

// Status and Incident are the API's.
type (
	Status   = api.EntropyStatus
	Incident = api.EntropyIncident
)

// ErrNoIncident: Dismiss found no open incident.
var ErrNoIncident = errors.New("entropy: no open incident")

const (
	// ringSeconds: the per-second counts kept in memory.
	ringSeconds = 3600
	// historyDays: how long the hourly maxima, the baseline, are kept.
	historyDays = 7
	// settle: a window enters the baseline only this long after it ended,
	// so that the start of an attack never raises its own bar.
	settle = 60
	// gapSeconds: when walking back from a detection to its first write,
	// this many quiet seconds in a row end the walk.
	gapSeconds = 3
	// walkSeconds bounds that walk.
	walkSeconds = 600
)

// Config configures a Monitor.
type Config struct {
	// Dir holds the monitor's state (entropy.json, entropy.map); "" keeps
	// it in memory only.
	Dir    string
	Logger *slog.Logger
	// Now is the clock (detection times).
	Now func() time.Time
}

// bucket counts one second of the source's writes (by the entries' time).
type bucket struct {
	sec      int64 // Unix seconds; 0: empty
	lowHigh  int64
	firstSeq uint64 // the first entry with a low-to-high overwrite
}

// state is what entropy.json holds.
type state struct {
	Policy Policy `json:"policy"`
	// Hours maps an hour (Unix seconds / 3600) to the most low-to-high
	// bytes any settled window ending in it saw.
	Hours      map[int64]int64 `json:"hours"`
	FirstSec   int64           `json:"first_sec"` // the first second seen
	Classified int64           `json:"classified_bytes"`
	High       int64           `json:"high_bytes"`
	LowToHigh  int64           `json:"low_to_high_bytes"`
	Incident   *Incident       `json:"incident,omitempty"`
}

// Monitor classifies one replica's incoming writes and detects jumps of
// low-to-high overwrites. Safe for concurrent use; the Observe methods are
// called from the replica's receive path and cost one histogram per 4 KiB
// block.
type Monitor struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	st      state
	maps    map[uint16]classMap
	ring    [ringSeconds]bucket
	newest  int64 // the newest second seen
	settled int64 // windows ending at or before this are in st.Hours
	dirty   bool
	onAlert func(Incident)
}

// New opens the monitor's state in cfg.Dir, or starts empty.
func New(cfg Config) (*Monitor, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	m := &Monitor{cfg: cfg, log: cfg.Logger, maps: map[uint16]classMap{}, st: state{Hours: map[int64]int64{}}}
	if cfg.Dir == "" {
		return m, nil
	}
	b, err := os.ReadFile(m.statePath())
	switch {
	case errors.Is(err, os.ErrNotExist):
		return m, nil
	case err != nil:
		return nil, fmt.Errorf("read entropy state: %w", err)
	}
	if err := json.Unmarshal(b, &m.st); err != nil {
		// The detector's memory is advisory: a corrupt file costs its
		// history, never the replica.
		m.log.Warn("entropy state unreadable; the detector starts learning again", "err", err)
		m.st = state{Hours: map[int64]int64{}}
	}
	if m.st.Hours == nil {
		m.st.Hours = map[int64]int64{}
	}
	if err := m.loadMap(); err != nil {
		m.log.Warn("entropy class map unreadable; blocks are classified again as they are written", "err", err)
		m.maps = map[uint16]classMap{}
	}
	return m, nil
}

func (m *Monitor) statePath() string { return filepath.Join(m.cfg.Dir, "entropy.json") }
func (m *Monitor) mapPath() string   { return filepath.Join(m.cfg.Dir, "entropy.map") }

// OnIncident sets a function called (outside the lock) when an incident
// is raised.
func (m *Monitor) OnIncident(fn func(Incident)) {
	m.mu.Lock()
	m.onAlert = fn
	m.mu.Unlock()
}

// SetPolicy sets the thresholds (idempotent; persisted at the next Save).
func (m *Monitor) SetPolicy(p Policy) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.Policy != p {
		m.st.Policy = p
		m.dirty = true
	}
}

// Policy returns the thresholds as set (without defaults).
func (m *Monitor) Policy() Policy {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st.Policy
}

// ObserveBase classifies initial-copy data: it sets the blocks' classes
// and counts nothing (there is no earlier content to compare with).
func (m *Monitor) ObserveBase(diskID uint16, off int64, p []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.classify(diskID, off, p)
}

// ObserveReset forgets every block's class (a new initial copy).
func (m *Monitor) ObserveReset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.maps = map[uint16]classMap{}
	m.dirty = true
}

// ObserveEntries classifies the writes of entries received in order,
// counts low-to-high overwrites by the second of each entry's time, and
// raises an incident if the newest window jumps.
func (m *Monitor) ObserveEntries(es []*journal.Entry) {
	m.mu.Lock()
	var raised *Incident
	for _, e := range es {
		switch e.Kind {
		case journal.KindWrite:
			sec := e.Time / int64(time.Second)
			b := m.bucketFor(sec)
			if n := m.classify(e.Disk, int64(e.Offset), e.Data); n > 0 && b != nil {
				if b.lowHigh == 0 {
					b.firstSeq = e.Seq
				}
				b.lowHigh += n
			}
		case journal.KindZero, journal.KindTrim:
			m.setRange(e.Disk, int64(e.Offset), int64(e.Length), Zero)
		}
	}
	if len(es) > 0 {
		raised = m.evaluate()
	}
	fn := m.onAlert
	m.mu.Unlock()
	if raised != nil && fn != nil {
		fn(*raised)
	}
}

// classify sets the classes of the whole blocks p covers at off and
// returns the bytes of blocks that went from Low to High.
func (m *Monitor) classify(diskID uint16, off int64, p []byte) (lowHigh int64) {
	cm := m.maps[diskID]
	first := (off + BlockSize - 1) / BlockSize
	end := (off + int64(len(p))) / BlockSize
	if need := (end + 3) / 4; need > int64(len(cm)) {
		cm = append(cm, make(classMap, need-int64(len(cm)))...)
		m.maps[diskID] = cm
	}
	// A partly written block's content is not known: Unknown.
	if off%BlockSize != 0 {
		cm.set(off/BlockSize, Unknown)
	}
	if (off+int64(len(p)))%BlockSize != 0 && end >= first {
		cm.set(end, Unknown)
	}
	for b := first; b < end; b++ {
		i := b*BlockSize - off
		c := Classify(p[i : i+BlockSize])
		old := cm.set(b, c)
		m.st.Classified += BlockSize
		if c == High {
			m.st.High += BlockSize
			if old == Low {
				m.st.LowToHigh += BlockSize
				lowHigh += BlockSize
			}
		}
	}
	m.dirty = true
	return lowHigh
}

func (m *Monitor) setRange(diskID uint16, off, n int64, c Class) {
	cm := m.maps[diskID]
	for b := off / BlockSize; b*BlockSize < off+n; b++ {
		whole := b*BlockSize >= off && (b+1)*BlockSize <= off+n
		if whole {
			cm.set(b, c)
		} else {
			cm.set(b, Unknown)
		}
	}
	m.dirty = true
}

// bucketFor returns sec's bucket, advancing the ring (and settling the
// windows that left it) when sec is new; nil for a second older than the
// ring holds.
func (m *Monitor) bucketFor(sec int64) *bucket {
	if m.st.FirstSec == 0 {
		m.st.FirstSec = sec
	}
	if sec > m.newest {
		m.newest = sec
		m.settle()
	}
	if sec <= m.newest-ringSeconds {
		return nil
	}
	b := &m.ring[sec%ringSeconds]
	if b.sec != sec {
		*b = bucket{sec: sec}
	}
	return b
}

func (m *Monitor) count(sec int64) (int64, uint64) {
	b := &m.ring[((sec%ringSeconds)+ringSeconds)%ringSeconds]
	if b.sec != sec {
		return 0, 0
	}
	return b.lowHigh, b.firstSeq
}

func (m *Monitor) window() int64 {
	return max(int64(m.st.Policy.WithDefaults().Window/time.Second), 1)
}

// windowSum is the low-to-high bytes of the window ending at sec.
func (m *Monitor) windowSum(sec int64) int64 {
	var s int64
	for t := sec - m.window() + 1; t <= sec; t++ {
		n, _ := m.count(t)
		s += n
	}
	return s
}

// settle moves the windows that ended settle seconds ago into the hourly
// maxima, skipping any that overlap the open incident.
func (m *Monitor) settle() {
	to := m.newest - settle
	from := max(m.settled+1, to-ringSeconds+settle+1)
	for s := from; s <= to; s++ {
		if inc := m.st.Incident; inc != nil && s >= inc.Start.Unix()-m.window() {
			continue
		}
		if sum := m.windowSum(s); sum > m.st.Hours[s/3600] {
			m.st.Hours[s/3600] = sum
			m.dirty = true
		}
	}
	m.settled = max(m.settled, to)
	for h := range m.st.Hours {
		if h < m.newest/3600-historyDays*24 {
			delete(m.st.Hours, h)
		}
	}
}

// baseline is the most low-to-high bytes any settled window of the
// history saw.
func (m *Monitor) baseline() int64 {
	var b int64
	for _, v := range m.st.Hours {
		b = max(b, v)
	}
	return b
}

// evaluate raises an incident (returned) when the newest window passes
// both thresholds, or updates the open one's peak.
func (m *Monitor) evaluate() *Incident {
	pol := m.st.Policy.WithDefaults()
	if pol.Disabled {
		return nil
	}
	sum := m.windowSum(m.newest)
	if inc := m.st.Incident; inc != nil {
		if sum > inc.PeakBytes {
			inc.PeakBytes = sum
			m.dirty = true
		}
		return nil
	}
	base := m.baseline()
	if sum < pol.MinBytes || float64(sum) <= pol.Factor*float64(base) {
		return nil
	}
	// The first write of the jump: walk back from the newest second over
	// seconds busier than both the baseline's average and a quarter of
	// the threshold's (a stray overwrite now and then is not the jump),
	// until a quiet gap.
	perSec := max(base/m.window(), pol.MinBytes/m.window()/4)
	first, firstSeq, quiet := m.newest, uint64(0), 0
	for s := m.newest; s > m.newest-walkSeconds && quiet <= gapSeconds; s-- {
		n, seq := m.count(s)
		if n > perSec && seq != 0 {
			first, firstSeq, quiet = s, seq, 0
		} else {
			quiet++
		}
	}
	inc := &Incident{Detected: m.cfg.Now().UTC(), Start: time.Unix(first, 0).UTC(), FirstSeq: firstSeq, PeakBytes: sum, BaselineBytes: base}
	m.st.Incident = inc
	m.dirty = true
	m.log.Warn("ransomware suspected: low-entropy blocks overwritten with high-entropy data",
		"window_bytes", sum, "baseline_bytes", base, "first_seq", firstSeq, "start", inc.Start)
	c := *inc
	return &c
}

// Status reports the counts and the open incident (its LastClean is the
// caller's to fill: the monitor does not know the points).
func (m *Monitor) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Status{Policy: m.st.Policy.WithDefaults(), WindowBytes: m.windowSum(m.newest), BaselineBytes: m.baseline(),
		ClassifiedBytes: m.st.Classified, HighBytes: m.st.High, LowToHighBytes: m.st.LowToHigh}
	if m.st.FirstSec != 0 && m.newest > m.st.FirstSec {
		st.HistorySeconds = m.newest - m.st.FirstSec
	}
	if inc := m.st.Incident; inc != nil {
		c := *inc
		st.Incident = &c
	}
	return st
}

// Incident returns the open incident, if any.
func (m *Monitor) Incident() (Incident, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.st.Incident == nil {
		return Incident{}, false
	}
	return *m.st.Incident, true
}

// Dismiss closes the open incident (the operator has dealt with it). Its
// windows never enter the baseline. ErrNoIncident if none is open.
func (m *Monitor) Dismiss() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	inc := m.st.Incident
	if inc == nil {
		return ErrNoIncident
	}
	m.st.Incident = nil
	// Skip the incident's seconds when settling.
	m.settled = max(m.settled, m.newest)
	m.dirty = true
	return nil
}

// Save writes the state and the class map if they changed (durably, each
// through atomicfile). A no-op without a Dir.
func (m *Monitor) Save() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cfg.Dir == "" || !m.dirty {
		return nil
	}
	if err := atomicfile.WriteJSON(m.statePath(), m.st, 0o600); err != nil {
		return fmt.Errorf("save entropy state: %w", err)
	}
	if err := atomicfile.WriteFile(m.mapPath(), m.encodeMap(), 0o600); err != nil {
		return fmt.Errorf("save entropy class map: %w", err)
	}
	m.dirty = false
	return nil
}

// Close saves the state.
func (m *Monitor) Close() error { return m.Save() }

var mapMagic = []byte("FERRYENT1\n")

// encodeMap: the magic, then per disk (by id) its id (uint16), length
// (uint64) and bytes, little-endian.
func (m *Monitor) encodeMap() []byte {
	var buf bytes.Buffer
	buf.Write(mapMagic)
	ids := make([]int, 0, len(m.maps))
	for id := range m.maps {
		ids = append(ids, int(id))
	}
	sort.Ints(ids)
	for _, id := range ids {
		cm := m.maps[uint16(id)]
		binary.Write(&buf, binary.LittleEndian, uint16(id))
		binary.Write(&buf, binary.LittleEndian, uint64(len(cm)))
		buf.Write(cm)
	}
	return buf.Bytes()
}

func (m *Monitor) loadMap() error {
	b, err := os.ReadFile(m.mapPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	maps, err := decodeMap(b)
	if err != nil {
		return err
	}
	m.maps = maps
	return nil
}

func decodeMap(b []byte) (map[uint16]classMap, error) {
	if !bytes.HasPrefix(b, mapMagic) {
		return nil, errors.New("entropy map: bad magic")
	}
	r := bytes.NewReader(b[len(mapMagic):])
	maps := map[uint16]classMap{}
	for r.Len() > 0 {
		var id uint16
		var n uint64
		if err := binary.Read(r, binary.LittleEndian, &id); err != nil {
			return nil, fmt.Errorf("entropy map: %w", err)
		}
		if err := binary.Read(r, binary.LittleEndian, &n); err != nil {
			return nil, fmt.Errorf("entropy map: %w", err)
		}
		if n > uint64(r.Len()) {
			return nil, fmt.Errorf("entropy map: disk %d: %d bytes, %d left", id, n, r.Len())
		}
		cm := make(classMap, n)
		if _, err := io.ReadFull(r, cm); err != nil {
			return nil, fmt.Errorf("entropy map: %w", err)
		}
		maps[id] = cm
	}
	return maps, nil
}
