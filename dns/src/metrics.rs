//! Prometheus metrics of the dns binary, rendered at `GET /metrics`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tether_db::feed::FeedMetrics;

/// Response codes counted separately; everything else is `other`.
const RCODES: [&str; 6] = ["noerror", "nxdomain", "refused", "servfail", "formerr", "other"];

/// Every metric, with handles obtained once so the query path only bumps an atomic.
pub struct Metrics {
    registry: Registry,
    responses: [Counter; RCODES.len()],
    /// Full reloads of the view.
    pub full_reloads: Counter,
    /// Reloads of only the zones and domains a notification named.
    pub partial_reloads: Counter,
    /// The change feed: notifications, errors, whether the listener is connected.
    pub feed: FeedMetrics,
    /// UDP queries dropped unanswered because the catalog was at its bound of queries in flight.
    pub udp_shed: Counter,
    /// Domains in the current view.
    pub domains: Gauge,
    /// Zones in the current view.
    pub zones: Gauge,
    /// Admin API responses by status class.
    pub api_responses: Family<StatusLabel, Counter>,
    /// Zone transfer requests by what they got: `axfr`, `ixfr` (incremental), `ixfr-full` (the whole zone in an
    /// IXFR answer), `ixfr-current` (just the SOA), `refused`, `tsig-error`.
    pub transfers: Family<KindLabel, Counter>,
    /// NOTIFY messages by outcome: `sent`, `acknowledged`, `refused`, `unanswered` (after six attempts).
    pub notifies: Family<KindLabel, Counter>,
    /// UDP answers over the response rate limit: `dropped` or `slipped` (sent truncated).
    pub rrl: Family<KindLabel, Counter>,
    /// DNS-over-TCP connections closed at accept: `total` (at `tcp_max_connections`) or `per_source`.
    pub tcp_refused: Family<KindLabel, Counter>,
}

/// A label naming a kind of event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What happened.
    pub kind: &'static str,
}

/// Label of an admin API response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// HTTP status code.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RcodeLabel {
    rcode: &'static str,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether_dns");
        let responses_family = Family::<RcodeLabel, Counter>::default();
        registry.register("responses", "DNS responses sent, by response code", responses_family.clone());
        let responses = RCODES.map(|rcode| responses_family.get_or_create(&RcodeLabel { rcode }).clone());
        let metrics = Self {
            responses,
            full_reloads: Counter::default(),
            partial_reloads: Counter::default(),
            feed: FeedMetrics::default(),
            udp_shed: Counter::default(),
            domains: Gauge::default(),
            zones: Gauge::default(),
            api_responses: Family::default(),
            transfers: Family::default(),
            notifies: Family::default(),
            rrl: Family::default(),
            tcp_refused: Family::default(),
            registry,
        };
        let mut registry = metrics.registry;
        registry.register("view_full_reloads", "Full reloads of the view", metrics.full_reloads.clone());
        registry.register(
            "view_partial_reloads",
            "Reloads of only the changed zones and domains",
            metrics.partial_reloads.clone(),
        );
        metrics.feed.register(&mut registry);
        registry.register(
            "udp_shed",
            "UDP queries dropped while the catalog had its most queries in flight",
            metrics.udp_shed.clone(),
        );
        registry.register("view_domains", "Domains in the served view", metrics.domains.clone());
        registry.register("view_zones", "Zones in the served view", metrics.zones.clone());
        registry.register("api_responses", "Admin API responses by status", metrics.api_responses.clone());
        registry.register("zone_transfers", "Zone transfer requests by what they got", metrics.transfers.clone());
        registry.register("notifies", "NOTIFY messages by outcome", metrics.notifies.clone());
        registry.register("rrl", "UDP answers over the response rate limit, dropped or slipped", metrics.rrl.clone());
        registry.register(
            "tcp_connections_refused",
            "DNS-over-TCP connections closed at accept, over the total or the per-source cap",
            metrics.tcp_refused.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts one DNS response.
    pub fn count_response(&self, rcode: u16) {
        let index = match rcode {
            0 => 0,
            3 => 1,
            5 => 2,
            2 => 3,
            1 => 4,
            _ => 5,
        };
        self.responses[index].inc();
    }

    /// Counts one event of `kind` in `family`.
    pub fn count(family: &Family<KindLabel, Counter>, kind: &'static str) {
        family.get_or_create(&KindLabel { kind }).inc();
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
