//! Prometheus metrics, rendered at `GET /metrics`: per domain flows, bytes, errors, failovers and refusals.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tether_db::feed::FeedMetrics;

use crate::table::Protocol;

/// Every metric. Flows resolve their per-domain handles once ([`FlowMetrics`]), so the data path only adds.
pub struct Metrics {
    registry: Registry,
    flows: Family<FlowLabels, Counter>,
    active: Family<FlowLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    failovers: Family<DomainLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    /// Full reloads of the table.
    pub full_reloads: Counter,
    /// Reloads of only the domains a notification named.
    pub partial_reloads: Counter,
    /// The change feed: notifications, errors, whether the listener is connected.
    pub feed: FeedMetrics,
    /// Domains in the table.
    pub domains: Gauge,
    /// Listeners bound.
    pub listeners: Gauge,
    /// Listeners that could not be bound (retried).
    pub bind_errors: Counter,
}

/// The counters of one flow's domain and protocol.
#[derive(Clone)]
pub struct FlowMetrics {
    /// Flows accepted.
    pub flows: Counter,
    /// Flows running.
    pub active: Gauge,
    /// Bytes from clients to sites.
    pub bytes_up: Counter,
    /// Bytes from sites to clients.
    pub bytes_down: Counter,
    /// Connects that failed, moving the flow to another address.
    pub failovers: Counter,
    errors: Family<ErrorLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    domain: String,
    protocol: &'static str,
}

/// Why a flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The domain's flow cap is reached.
    DomainCap,
    /// The client's flow cap is reached (an IPv4 address, or an IPv6 /64).
    ClientCap,
    /// The forwarder's own cap on all flows is reached.
    GlobalCap,
    /// No live address, no fallback, or none accepted.
    NoTarget,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    domain: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    domain: String,
    protocol: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    domain: String,
    protocol: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    domain: String,
    protocol: &'static str,
    reason: &'static str,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether_forwarder");
        let metrics = Self {
            flows: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            failovers: Family::default(),
            refused: Family::default(),
            full_reloads: Counter::default(),
            partial_reloads: Counter::default(),
            feed: FeedMetrics::default(),
            domains: Gauge::default(),
            listeners: Gauge::default(),
            bind_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("flows", "Flows accepted, per domain and protocol", metrics.flows.clone());
        registry.register("flows_active", "Flows running, per domain and protocol", metrics.active.clone());
        registry.register("bytes", "Bytes relayed, per domain, protocol and direction", metrics.bytes.clone());
        registry.register("errors", "Relay errors, per domain, protocol and kind", metrics.errors.clone());
        registry.register("failovers", "Connects that failed and moved to another address", metrics.failovers.clone());
        registry.register("refused", "Flows refused, per domain, protocol and reason", metrics.refused.clone());
        registry.register("table_full_reloads", "Full reloads of the target table", metrics.full_reloads.clone());
        registry.register(
            "table_partial_reloads",
            "Reloads of only the changed domains",
            metrics.partial_reloads.clone(),
        );
        metrics.feed.register(&mut registry);
        registry.register("domains", "Domains in the target table", metrics.domains.clone());
        registry.register("listeners", "Listeners bound", metrics.listeners.clone());
        registry.register("bind_errors", "Listeners that could not be bound", metrics.bind_errors.clone());
        Self { registry, ..metrics }
    }

    /// The handles of one domain and protocol, for a flow to keep.
    pub fn flow(&self, domain: &str, protocol: Protocol) -> FlowMetrics {
        let protocol = protocol.as_str();
        let flow = FlowLabels { domain: domain.to_owned(), protocol };
        let bytes = |direction| BytesLabels { domain: domain.to_owned(), protocol, direction };
        // One statement each: a family's read guard must be gone before the same family creates the next label.
        let flows = self.flows.get_or_create(&flow).clone();
        let active = self.active.get_or_create(&flow).clone();
        let bytes_up = self.bytes.get_or_create(&bytes("up")).clone();
        let bytes_down = self.bytes.get_or_create(&bytes("down")).clone();
        let failovers = self.failovers.get_or_create(&DomainLabels { domain: domain.to_owned() }).clone();
        FlowMetrics {
            flows,
            active,
            bytes_up,
            bytes_down,
            failovers,
            errors: self.errors.clone(),
            refused: self.refused.clone(),
            domain: domain.to_owned(),
            protocol,
        }
    }

    /// Counts a refused flow without resolving a flow's handles (cheap under a flood).
    pub fn refuse(&self, domain: &str, protocol: Protocol, why: Refusal) {
        let labels = RefusedLabels { domain: domain.to_owned(), protocol: protocol.as_str(), reason: why.as_str() };
        self.refused.get_or_create(&labels).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        tether_service::http::render(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowMetrics {
    /// Counts an error of `kind` (`connect`, `relay`, `proxy_header`, `send`, …).
    pub fn error(&self, kind: &'static str) {
        let labels = ErrorLabels { domain: self.domain.clone(), protocol: self.protocol, kind };
        self.errors.get_or_create(&labels).inc();
    }

    /// Counts a refused flow.
    pub fn refused(&self, why: Refusal) {
        let labels = RefusedLabels { domain: self.domain.clone(), protocol: self.protocol, reason: why.as_str() };
        self.refused.get_or_create(&labels).inc();
    }

    /// Counts a flow as accepted and running until the guard drops.
    pub fn start(&self) -> RunningFlow {
        self.flows.inc();
        self.active.inc();
        RunningFlow(self.active.clone())
    }
}

/// Keeps a flow in the running gauge.
#[derive(Debug)]
pub struct RunningFlow(Gauge);

impl Drop for RunningFlow {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DomainCap => "domain_cap",
            Self::ClientCap => "client_cap",
            Self::GlobalCap => "global_cap",
            Self::NoTarget => "no_target",
        }
    }
}
