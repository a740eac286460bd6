//! What a zone publishes to secondaries, and the journal of its changes that IXFR answers from.
//!
//! The journal is built by dns from consecutive views, not by Postgres: the records a zone publishes are the answer
//! rules' output (live addresses of the best priority, fallbacks, generated SRV targets), computed only here. Each
//! rebuild of a zone with secondaries compares its published records with the previous view's and keeps the
//! difference under the two serials. A view rebuild already coalesces every notification pending, so a heartbeat
//! storm of 10,000 transitions is a handful of deltas, and the journal is bounded in entries, records and age.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    rr::{RData, Record},
    serialize::binary::BinEncodable,
};

/// Most deltas kept per zone.
pub const MAX_DELTAS: usize = 64;
/// Most records (deleted plus added) kept per zone's journal.
pub const MAX_RECORDS: usize = 20_000;
/// Oldest delta kept.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

/// A zone as a secondary receives it: the SOA and every other record, each once, in a canonical order.
#[derive(Debug)]
pub struct Published {
    /// The SOA, with its own TTL.
    pub soa: Record,
    /// Everything else, sorted by wire form; the keys are that form.
    records: Vec<(Box<[u8]>, Record)>,
}

/// The change from one serial to the next.
#[derive(Debug)]
pub struct Delta {
    /// The SOA before.
    pub old_soa: Record,
    /// The SOA after.
    pub new_soa: Record,
    /// Records gone.
    pub deleted: Vec<Record>,
    /// Records new.
    pub added: Vec<Record>,
    at: Instant,
}

/// A zone's recent deltas, oldest first, each starting at the serial the previous one ended at.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    deltas: VecDeque<Arc<Delta>>,
}

impl Published {
    /// `soa` and `records` in canonical order, duplicates dropped.
    pub fn new(soa: Record, records: impl IntoIterator<Item = Record>) -> Self {
        let mut records: Vec<(Box<[u8]>, Record)> =
            records.into_iter().filter_map(|r| Some((r.to_bytes().ok()?.into_boxed_slice(), r))).collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records.dedup_by(|a, b| a.0 == b.0);
        Self { soa, records }
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        serial_of(&self.soa)
    }

    /// Every record but the SOA.
    pub fn records(&self) -> impl ExactSizeIterator<Item = &Record> {
        self.records.iter().map(|(_, r)| r)
    }

    /// Whether `self` and `other` hold the same records (SOA aside).
    pub fn same_records(&self, other: &Self) -> bool {
        self.records.len() == other.records.len() && self.records.iter().zip(&other.records).all(|(a, b)| a.0 == b.0)
    }

    /// What changed from `old` to `self`.
    fn since(&self, old: &Self) -> Delta {
        let (mut deleted, mut added) = (Vec::new(), Vec::new());
        let (mut a, mut b) = (old.records.iter().peekable(), self.records.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    a.next();
                    b.next();
                }
                (Some(x), Some(y)) if x.0 < y.0 => deleted.extend(a.next().map(|r| r.1.clone())),
                (Some(_), None) => deleted.extend(a.next().map(|r| r.1.clone())),
                (_, Some(_)) => added.extend(b.next().map(|r| r.1.clone())),
                (None, None) => break,
            }
        }
        Delta { old_soa: old.soa.clone(), new_soa: self.soa.clone(), deleted, added, at: Instant::now() }
    }
}

impl Delta {
    /// Records this delta holds.
    pub fn len(&self) -> usize {
        self.deleted.len() + self.added.len()
    }

    /// Whether it changes no record (only the serial).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Journal {
    /// This journal with the change from `old` to `new` appended (when the serial moved), trimmed to its bounds.
    /// A serial that did not move leaves the journal as it is; one that went back (a restored database) clears it.
    pub fn after(&self, old: &Published, new: &Published) -> Self {
        let (from, to) = (old.serial(), new.serial());
        if from == to {
            return self.clone();
        }
        if !serial_newer(to, from) {
            return Self::default();
        }
        let mut deltas = self.deltas.clone();
        deltas.push_back(Arc::new(new.since(old)));
        let now = Instant::now();
        let mut records: usize = deltas.iter().map(|d| d.len()).sum();
        while let Some(oldest) = deltas.front() {
            let expired = now.duration_since(oldest.at) > MAX_AGE;
            if deltas.len() <= MAX_DELTAS && records <= MAX_RECORDS && !expired {
                break;
            }
            records -= oldest.len();
            deltas.pop_front();
        }
        Self { deltas }
    }

    /// The deltas from `serial` to the end, in order; `None` when the journal does not reach back to it.
    pub fn since(&self, serial: u32) -> Option<Vec<Arc<Delta>>> {
        let start = self.deltas.iter().rposition(|d| serial_of(&d.old_soa) == serial)?;
        Some(self.deltas.iter().skip(start).cloned().collect())
    }

    /// Deltas kept.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    /// Whether no delta is kept.
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
}

/// The serial of an SOA record (0 for anything else).
pub fn serial_of(soa: &Record) -> u32 {
    match &soa.data {
        RData::SOA(soa) => soa.serial,
        _ => 0,
    }
}

/// RFC 1982 serial arithmetic: whether `a` is newer than `b`.
pub fn serial_newer(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::rr::{
        Name,
        rdata::{A, SOA},
    };

    use super::*;

    fn soa(serial: u32) -> Record {
        let name = Name::from_str("ho.test.").expect("name");
        let rdata = SOA::new(name.clone(), name.clone(), serial, 3600, 600, 86400, 1);
        Record::from_rdata(name, 60, RData::SOA(rdata))
    }

    fn a(owner: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(Name::from_str(owner).expect("name"), 1, RData::A(A::from(std::net::Ipv4Addr::from(ip))))
    }

    fn zone(serial: u32, records: &[Record]) -> Published {
        Published::new(soa(serial), records.iter().cloned())
    }

    #[test]
    fn a_delta_holds_what_went_and_what_came() {
        let old = zone(1, &[a("x.ho.test.", [198, 18, 0, 1]), a("x.ho.test.", [198, 18, 0, 2])]);
        let new = zone(2, &[a("x.ho.test.", [198, 18, 0, 2]), a("y.ho.test.", [198, 18, 0, 3])]);
        let journal = Journal::default().after(&old, &new);
        let deltas = journal.since(1).expect("reaches serial 1");
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].deleted, [a("x.ho.test.", [198, 18, 0, 1])]);
        assert_eq!(deltas[0].added, [a("y.ho.test.", [198, 18, 0, 3])]);
        assert_eq!((serial_of(&deltas[0].old_soa), serial_of(&deltas[0].new_soa)), (1, 2));
        assert!(journal.since(2).is_none(), "nothing starts at the current serial");
        assert!(journal.since(0).is_none(), "older than the journal");
    }

    #[test]
    fn deltas_chain_and_the_journal_stays_bounded() {
        let mut journal = Journal::default();
        let mut previous = zone(1, &[]);
        for serial in 2..(2 + MAX_DELTAS as u32 + 10) {
            let next = zone(serial, &[a("x.ho.test.", [198, 18, 0, (serial % 250) as u8])]);
            journal = journal.after(&previous, &next);
            previous = next;
        }
        assert_eq!(journal.len(), MAX_DELTAS);
        let tail = journal.since(60).expect("recent serials are kept");
        assert_eq!(serial_of(&tail.last().expect("deltas").new_soa), previous.serial());
        assert!(tail.windows(2).all(|w| serial_of(&w[0].new_soa) == serial_of(&w[1].old_soa)));
        assert!(journal.since(2).is_none(), "the oldest were dropped");
        // Same serial: nothing recorded; a serial going back: the journal is cleared.
        assert_eq!(journal.after(&previous, &zone(previous.serial(), &[])).len(), MAX_DELTAS);
        assert!(journal.after(&previous, &zone(3, &[])).is_empty());
    }

    #[test]
    fn big_changes_push_old_deltas_out() {
        let many: Vec<Record> =
            (0..MAX_RECORDS / 2 + 1).map(|i| a(&format!("n{i}.ho.test."), [198, 18, 1, 1])).collect();
        let empty = zone(1, &[]);
        let full = zone(2, &many);
        let journal = Journal::default().after(&empty, &full).after(&full, &zone(3, &[]));
        assert_eq!(journal.len(), 1, "two deltas of over half the bound each do not fit");
        assert!(journal.since(2).is_some());
    }

    #[test]
    fn serials_compare_as_rfc_1982_says() {
        assert!(serial_newer(2, 1));
        assert!(serial_newer(0, u32::MAX), "wraps");
        assert!(!serial_newer(1, 2));
        assert!(!serial_newer(5, 5));
    }
}
