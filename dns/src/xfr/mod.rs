//! Zone transfers to standard secondaries (NSD, Knot, BIND): AXFR and IXFR answers ([`serve`]), the journal IXFR
//! answers from ([`journal`]), NOTIFY on every serial change ([`notify`]), and the per-zone policy with its TSIG
//! keys ([`policy`]).

pub mod journal;
pub mod notify;
pub mod policy;
pub mod serve;

pub use journal::{Delta, Journal, Published, serial_newer, serial_of};
pub use policy::{NotifyTarget, PolicyError, Secondary, TransferPolicy, TsigKey};

/// A zone with secondaries: what they receive, and its recent changes.
#[derive(Debug)]
pub struct ZoneXfr {
    /// The zone as transferred: one content per serial, fixed when the serial is first seen.
    pub published: std::sync::Arc<Published>,
    /// The deltas that led to it.
    pub journal: Journal,
}
