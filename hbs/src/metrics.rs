//! Prometheus metrics, rendered at `GET /metrics`: the heartbeat figures (read from the driver's counters at scrape
//! time, so nothing is added per packet), targets by state, state writes and registrations with their latency,
//! sessions, refused handshakes, Postgres reachability and draining.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::driver::Counters;

/// Every metric of one hbs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// State changes written, by the state written.
    pub transitions: Family<[(&'static str, &'static str); 1], Counter>,
    /// Batches of state changes written.
    pub write_batches: Counter,
    /// Failed batch writes (retried).
    pub write_errors: Counter,
    /// Seconds one batch write took.
    pub write_seconds: Histogram,
    /// Batches of registrations written.
    pub registration_batches: Counter,
    /// Seconds one registration batch took.
    pub registration_seconds: Histogram,
    /// NCU control sessions open.
    pub sessions: Gauge,
    /// Control connections accepted (handshake done).
    pub connections: Counter,
    /// 1 while Postgres answers.
    pub database_reachable: Gauge,
    /// 1 while this server drains.
    pub draining: Gauge,
}

impl Metrics {
    /// Registers every metric; the heartbeat figures are read from `counters` and `refused` at each scrape.
    pub fn new(counters: Arc<Counters>, refused: Arc<AtomicU64>) -> Self {
        let mut registry = Registry::with_prefix("hbs");
        let latency = || Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let metrics = Self {
            transitions: Family::default(),
            write_batches: Counter::default(),
            write_errors: Counter::default(),
            write_seconds: latency(),
            registration_batches: Counter::default(),
            registration_seconds: latency(),
            sessions: Gauge::default(),
            connections: Counter::default(),
            database_reachable: Gauge::default(),
            draining: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("transitions", "State changes written, by state", metrics.transitions.clone());
        registry.register("write_batches", "Batches of state changes written", metrics.write_batches.clone());
        registry.register("write_errors", "Failed batch writes (retried)", metrics.write_errors.clone());
        registry.register("write_seconds", "Seconds one batch write took", metrics.write_seconds.clone());
        registry.register(
            "registration_batches",
            "Batches of registrations written",
            metrics.registration_batches.clone(),
        );
        registry.register(
            "registration_seconds",
            "Seconds one registration batch took",
            metrics.registration_seconds.clone(),
        );
        registry.register("sessions", "NCU control sessions open", metrics.sessions.clone());
        registry.register("connections", "Control connections accepted", metrics.connections.clone());
        registry.register("database_reachable", "1 while Postgres answers", metrics.database_reachable.clone());
        registry.register("draining", "1 while this server drains", metrics.draining.clone());
        registry.register_collector(Box::new(Heartbeats { counters, refused }));
        Self { registry, ..metrics }
    }

    /// Counts a written change to `state` (`live`, `dead` or `pending`).
    pub fn transition(&self, state: &'static str) {
        self.transitions.get_or_create(&[("state", state)]).inc();
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        tether_service::http::render(&self.registry)
    }
}

/// The driver's counters, read at scrape time.
#[derive(Debug)]
struct Heartbeats {
    counters: Arc<Counters>,
    refused: Arc<AtomicU64>,
}

impl Collector for Heartbeats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        let counters = [
            ("pings", "Pings sent (re-probes included)", &c.pings),
            ("pongs", "Valid replies", &c.pongs),
            ("unproven", "Replies from another address than the one pinged: proved only by a ping to it", &c.unproven),
            ("forged", "Replies that failed authentication", &c.forged),
            ("stale", "Replies matching no outstanding probe", &c.stale),
            ("malformed", "Datagrams that are not heartbeat packets", &c.malformed),
            ("unknown", "Packets of unknown sessions or uplinks", &c.unknown),
            ("refused_handshakes", "Control connections refused at the handshake", &self.refused),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let total = ConstGauge::new(load(&c.targets));
        total.encode(encoder.encode_descriptor("targets", "Addresses monitored", None, total.metric_type())?)?;
        let mut by_state = encoder.encode_descriptor(
            "targets_by_state",
            "Addresses monitored, by state",
            None,
            total.metric_type(),
        )?;
        for (state, value) in [("pending", &c.pending), ("live", &c.live), ("dead", &c.dead)] {
            ConstGauge::new(load(value)).encode(by_state.encode_family(&[("state", state)])?)?;
        }
        Ok(())
    }
}

fn load(value: &AtomicU64) -> i64 {
    i64::try_from(value.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
}
