package agent

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/nbd"
	"github.com/ferry-dr/ferry/internal/replication"
)

// metrics are the agent's Prometheus metrics. The gauges are read from
// Status at scrape time (a collector), so that nothing in the data path
// updates them; only the NBD latency histogram is fed as requests complete,
// through a device wrapper (nbd.Observe).
type metrics struct {
	reg *prometheus.Registry
	nbd map[string]prometheus.Observer // per NBD operation, resolved once
}

func newMetrics(a *Agent) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	nbd := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ferry_nbd_request_duration_seconds",
		Help:    "Time to serve NBD requests on the site's exports, by operation.",
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10), // 10 µs .. 2.6 s
	}, []string{"op"})
	// Resolved here so that a request costs no label hashing.
	m.nbd = map[string]prometheus.Observer{}
	for _, op := range []string{"read", "write", "write_zeroes", "trim", "flush"} {
		m.nbd[op] = nbd.WithLabelValues(op)
	}
	m.reg.MustRegister(nbd, &statusCollector{a: a},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe is the nbd.Observer of every export.
func (m *metrics) observe(op string, _ int64, d time.Duration, _ error) {
	if o := m.nbd[op]; o != nil {
		o.Observe(d.Seconds())
	}
}

func (m *metrics) instrument(d nbd.Device) nbd.Device { return nbd.Observe(d, m.observe) }

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

var (
	descRPO = prometheus.NewDesc("ferry_replication_rpo_seconds",
		"Age of the oldest write the recovery site has not acknowledged (0 when in sync).", []string{"group", "peer"}, nil)
	descPending = prometheus.NewDesc("ferry_replication_pending_bytes",
		"Bytes written at this site and not yet acknowledged by the recovery site.", []string{"group", "peer"}, nil)
	descThroughput = prometheus.NewDesc("ferry_replication_throughput_bytes_per_second",
		"Replication throughput over the last seconds.", []string{"group", "peer"}, nil)
	descSent = prometheus.NewDesc("ferry_replication_sent_bytes_total",
		"Bytes sent to the recovery site since the agent started.", []string{"group", "peer"}, nil)
	descWire = prometheus.NewDesc("ferry_replication_link_bytes_total",
		"Bytes of replication frames sent, before (form=payload) and after (form=wire) compression.", []string{"group", "peer", "form"}, nil)
	descBacklog = prometheus.NewDesc("ferry_replication_backlog_bytes",
		"What the recovery site does not hold yet: journal not acknowledged, initial copy and resync left.", []string{"group", "peer"}, nil)
	descClears = prometheus.NewDesc("ferry_replication_backlog_clears_in_seconds",
		"Estimated seconds until the backlog is gone at the current pace (-1: it does not shrink).", []string{"group", "peer"}, nil)
	descCap = prometheus.NewDesc("ferry_replication_cap_bits_per_second",
		"Bandwidth cap in force for the stream (0: none).", []string{"group", "peer"}, nil)
	descLinkRate = prometheus.NewDesc("ferry_replication_link_estimate_bits_per_second",
		"Estimated rate of the link (TCP's delivery rate, bounded by the cap; 0: unknown).", []string{"group", "peer"}, nil)
	descCompressing = prometheus.NewDesc("ferry_replication_compressing",
		"1 while the stream compresses (the link is slower than the compressor gains), 0 while it sends plain.", []string{"group", "peer"}, nil)
	descConnected = prometheus.NewDesc("ferry_replication_link_up",
		"1 when the group streams or copies to its recovery site, 0 while it connects or retries.", []string{"group", "peer", "state"}, nil)
	descEntropy = prometheus.NewDesc("ferry_replica_entropy_bytes_total",
		"Bytes of the write stream the ransomware detector classified (kind=classified), found high-entropy (kind=high), and low-entropy blocks overwritten with high-entropy data (kind=low_to_high).", []string{"group", "kind"}, nil)
	descSuspected = prometheus.NewDesc("ferry_replica_ransomware_suspected",
		"1 while the replica has an open ransomware incident (low-to-high overwrites jumped), until dismissed.", []string{"group"}, nil)
	descJournal = prometheus.NewDesc("ferry_journal_bytes",
		"Size of a journal on disk: a protected group's at the source, a replica's at the recovery site.", []string{"group", "role"}, nil)
	descPoints = prometheus.NewDesc("ferry_recovery_points",
		"Recovery points a replica holds.", []string{"group"}, nil)
	descReplicaLag = prometheus.NewDesc("ferry_replica_last_write_timestamp_seconds",
		"Source time of the newest write a replica received.", []string{"group"}, nil)
	descVMs = prometheus.NewDesc("ferry_vms",
		"VMs this site runs, by state.", []string{"state"}, nil)
	descProblem = prometheus.NewDesc("ferry_problems",
		"Groups and replicas that did not open (damaged) or that failed and refuse writes, by kind; the agent's status says which and why.", []string{"kind"}, nil)
	descUnfolded = prometheus.NewDesc("ferry_unfolded_bytes",
		"Recent writes of a group held only in its journal, not yet folded into its images.", []string{"group"}, nil)
	descFold = prometheus.NewDesc("ferry_fold_remaining",
		"Work left in a committed group's background fold, by unit: journal entries of the old replica, bytes of the VM's writes since the failover (0 once the disks are plain images).", []string{"group", "unit"}, nil)
)

type statusCollector struct{ a *Agent }

func (c *statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRPO, descPending, descThroughput, descSent, descWire, descBacklog, descClears, descCap, descLinkRate, descCompressing, descConnected, descEntropy, descSuspected, descJournal, descPoints, descReplicaLag, descVMs, descProblem, descFold, descUnfolded} {
		ch <- d
	}
}

func (c *statusCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st := c.a.FullStatus(ctx) // with the VMs, which asks QEMU
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	problems := map[string]int{"group": 0, "replica": 0} // present even with none
	for _, p := range st.Problems {
		problems[p.Kind]++
	}
	for _, g := range st.Groups {
		if g.Failed != "" {
			problems["group"]++
		}
	}
	for k, n := range problems {
		gauge(descProblem, float64(n), k)
	}
	for _, g := range st.Groups {
		gauge(descJournal, float64(g.JournalBytes), g.Name, "source")
		gauge(descUnfolded, float64(g.UnfoldedBytes), g.Name)
		var f api.FoldStatus // zero for a group with plain images
		if g.Fold != nil {
			f = *g.Fold
		}
		gauge(descFold, float64(f.EntriesLeft), g.Name, "entries")
		gauge(descFold, float64(f.BytesLeft), g.Name, "bytes")
		r := g.Replication
		if r == nil {
			continue
		}
		gauge(descRPO, r.RPO, g.Name, g.PeerName)
		gauge(descPending, float64(r.PendingBytes), g.Name, g.PeerName)
		gauge(descThroughput, r.ThroughputBps, g.Name, g.PeerName)
		ch <- prometheus.MustNewConstMetric(descSent, prometheus.CounterValue, float64(r.SentBytes), g.Name, g.PeerName)
		ch <- prometheus.MustNewConstMetric(descWire, prometheus.CounterValue, float64(r.PayloadBytes), g.Name, g.PeerName, "payload")
		ch <- prometheus.MustNewConstMetric(descWire, prometheus.CounterValue, float64(r.WireBytes), g.Name, g.PeerName, "wire")
		gauge(descBacklog, float64(r.BacklogBytes), g.Name, g.PeerName)
		gauge(descClears, r.ClearsInSeconds, g.Name, g.PeerName)
		gauge(descCap, float64(r.CapBitsPerSecond), g.Name, g.PeerName)
		gauge(descLinkRate, float64(r.LinkBitsPerSecond), g.Name, g.PeerName)
		compressing := 0.0
		if r.Compressing {
			compressing = 1
		}
		gauge(descCompressing, compressing, g.Name, g.PeerName)
		up := 0.0
		switch r.State {
		case replication.StateStreaming, replication.StateInitialSync, replication.StateResync:
			up = 1
		}
		gauge(descConnected, up, g.Name, g.PeerName, string(r.State))
	}
	for _, r := range st.Replicas {
		gauge(descJournal, float64(r.JournalBytes), r.Group, "replica")
		gauge(descPoints, float64(r.Points), r.Group)
		if e := r.Entropy; e != nil {
			ch <- prometheus.MustNewConstMetric(descEntropy, prometheus.CounterValue, float64(e.ClassifiedBytes), r.Group, "classified")
			ch <- prometheus.MustNewConstMetric(descEntropy, prometheus.CounterValue, float64(e.HighBytes), r.Group, "high")
			ch <- prometheus.MustNewConstMetric(descEntropy, prometheus.CounterValue, float64(e.LowToHighBytes), r.Group, "low_to_high")
			suspected := 0.0
			if e.Incident != nil {
				suspected = 1
			}
			gauge(descSuspected, suspected, r.Group)
		}
		if !r.LastTime.IsZero() {
			gauge(descReplicaLag, float64(r.LastTime.UnixNano())/1e9, r.Group)
		}
	}
	states := map[string]int{"running": 0} // present even with no VM
	for _, v := range st.VMs {
		states[string(v.State)]++
	}
	for s, n := range states {
		gauge(descVMs, float64(n), s)
	}
}
