package vault

import (
	"context"
	"net/http"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the vault's Prometheus metrics: protection and site gauges
// read from the store at scrape time, and job durations observed when a
// job ends.
type metrics struct {
	reg    *prometheus.Registry
	jobs   *prometheus.HistogramVec
	events *prometheus.CounterVec
}

func newMetrics(v *Vault) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.jobs = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ferry_job_duration_seconds",
		Help:    "How long DR jobs took, by action and outcome (succeeded, failed).",
		Buckets: prometheus.ExponentialBuckets(0.05, 2.5, 12), // 50 ms .. 3 h
	}, []string{"action", "outcome"})
	m.events = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ferry_events_total",
		Help: "Events logged by this vault (GET /v1/events), by kind (raised, cleared, job-failed, job-succeeded) and severity.",
	}, []string{"kind", "severity"})
	m.reg.MustRegister(m.jobs, m.events, &vaultCollector{v: v},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) jobEnded(j Job) {
	m.jobs.WithLabelValues(j.Action, string(j.State)).Observe(j.Ended.Sub(j.Created).Seconds())
}

func (m *metrics) eventLogged(e Event) { m.events.WithLabelValues(e.Kind, e.Severity).Inc() }

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

var (
	descRPO = prometheus.NewDesc("ferry_protection_rpo_seconds",
		"Current RPO of a protection: age of the oldest write its recovery site lacks.", []string{"vm", "source", "target"}, nil)
	descRPOThreshold = prometheus.NewDesc("ferry_protection_rpo_threshold_seconds",
		"The protection's policy RPO thresholds.", []string{"vm", "level"}, nil)
	descHealth = prometheus.NewDesc("ferry_protection_health",
		"1 for the protection's current health (healthy, warning, critical), 0 for the others.", []string{"vm", "health"}, nil)
	descState = prometheus.NewDesc("ferry_protection_state",
		"1 for the protection's current state.", []string{"vm", "state"}, nil)
	descFailover = prometheus.NewDesc("ferry_protection_generation",
		"Failover generation of a protection (grows by one with every failover).", []string{"vm"}, nil)
	descSiteUp = prometheus.NewDesc("ferry_site_up",
		"1 if the vault reaches the site's agent.", []string{"site"}, nil)
	descJobRunning = prometheus.NewDesc("ferry_job_running",
		"1 while a job runs on the protection (action: its action), else 0 (action: none).", []string{"vm", "action"}, nil)
)

type vaultCollector struct{ v *Vault }

func (c *vaultCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRPO, descRPOThreshold, descHealth, descState, descFailover, descSiteUp, descJobRunning} {
		ch <- d
	}
}

func (c *vaultCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	b := func(ok bool) float64 {
		if ok {
			return 1
		}
		return 0
	}
	sites, _ := c.v.Sites(ctx)
	for _, s := range sites {
		gauge(descSiteUp, b(s.Reachable), s.Name)
	}
	ps, _ := c.v.Protections(ctx)
	for _, p := range ps {
		gauge(descRPO, p.RPOSeconds, p.VM, p.Source, p.Target)
		pol := c.v.policy(ctx, p.Policy)
		gauge(descRPOThreshold, pol.RPOWarning.Seconds(), p.VM, "warning")
		gauge(descRPOThreshold, pol.RPOCritical.Seconds(), p.VM, "critical")
		for _, h := range []api.Health{api.Healthy, api.Warning, api.Critical} {
			gauge(descHealth, b(p.Health == h), p.VM, string(h))
		}
		gauge(descState, 1, p.VM, string(p.State))
		gauge(descFailover, float64(p.Generation), p.VM)
		running := false
		if p.Job != "" {
			if j, err := c.v.Job(ctx, p.Job); err == nil {
				gauge(descJobRunning, 1, p.VM, j.Action)
				running = true
			}
		}
		if !running {
			gauge(descJobRunning, 0, p.VM, "none")
		}
	}
}

// RPOSample is one point of a protection's RPO history (api.RPOSample).
type RPOSample = api.RPOSample
