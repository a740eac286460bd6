//! Response rate limiting (RRL) for DNS over UDP: a source prefix (an IPv4 /24, an IPv6 /56 by default) gets at
//! most `rate` answers per second for one name (and, for errors, one response code), whatever it asks. Past it,
//! every `slip`-th answer goes out truncated (TC=1, no records: a real resolver retries over TCP, where the source is
//! proven), the others are dropped. A forged source thus gets the server to send its victim little more than the
//! victim would have asked for itself. TCP is never limited.
//!
//! The state is a fixed table of counters, one per hash slot of (prefix, name or response code), keyed with a
//! per-process random key so nobody can aim collisions: memory stays the same under any flood, and a collision only
//! makes two keys share a budget for that second.

use std::{
    hash::{BuildHasher, Hasher},
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use ipnet::IpNet;

/// Counter slots: 2^16 of 8 bytes.
const SLOTS: usize = 1 << 16;

/// What to do with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate: send it.
    Send,
    /// Over the rate, this one's turn to slip: send it truncated.
    Slip,
    /// Over the rate: drop it.
    Drop,
}

/// The limiter's settings (`rrl_*` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Answers per second per (prefix, name); 0 turns limiting off.
    pub rate: u32,
    /// Every `slip`-th answer over the rate goes out truncated; 0 drops them all, 1 truncates them all.
    pub slip: u32,
    /// Prefix length an IPv4 source is counted by.
    pub ipv4_prefix: u8,
    /// Prefix length an IPv6 source is counted by.
    pub ipv6_prefix: u8,
    /// Sources never limited (the operator's monitoring, loopback).
    pub exempt: Vec<IpNet>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { rate: 0, slip: 2, ipv4_prefix: 24, ipv6_prefix: 56, exempt: Vec::new() }
    }
}

/// The limiter: shared by every UDP answer.
pub struct Limiter {
    settings: Settings,
    /// Per slot: the second (since `start`) in the high 32 bits, answers in that second in the low 32.
    table: Box<[AtomicU64]>,
    hasher: std::hash::RandomState,
    start: Instant,
    /// Answers over the rate so far, to pick which slip.
    over: AtomicU64,
}

impl Limiter {
    /// A limiter with `settings` (off when the rate is 0: then it holds no table).
    pub fn new(settings: Settings) -> Self {
        let slots = if settings.rate == 0 { 0 } else { SLOTS };
        Self {
            table: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            settings,
            hasher: std::hash::RandomState::new(),
            start: Instant::now(),
            over: AtomicU64::new(0),
        }
    }

    /// A limiter that never limits.
    pub fn off() -> Self {
        Self::new(Settings::default())
    }

    /// Whether `source` is ever limited.
    pub fn applies_to(&self, source: IpAddr) -> bool {
        self.settings.rate != 0 && !self.settings.exempt.iter().any(|net| net.contains(&source))
    }

    /// Counts one answer to `source` for `name` (wire format, any case) with `rcode`, and says what to do with it.
    /// Positive answers are counted per name; errors (NXDOMAIN, REFUSED, …) per response code, so a flood of random
    /// names shares one budget.
    pub fn check(&self, source: IpAddr, name: &[u8], rcode: u16) -> Verdict {
        if !self.applies_to(source) {
            return Verdict::Send;
        }
        let mut hasher = self.hasher.build_hasher();
        match prefix(source, self.settings.ipv4_prefix, self.settings.ipv6_prefix) {
            IpAddr::V4(v4) => hasher.write(&v4.octets()),
            IpAddr::V6(v6) => hasher.write(&v6.octets()),
        }
        hasher.write_u16(rcode);
        if rcode == 0 {
            for byte in name {
                hasher.write_u8(byte.to_ascii_lowercase());
            }
        }
        let slot = &self.table[usize::try_from(hasher.finish()).unwrap_or(0) % self.table.len()];
        let second = self.start.elapsed().as_secs() & 0xffff_ffff;
        let count = match slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old >> 32 == second { old.saturating_add(1) } else { (second << 32) | 1 })
        }) {
            Ok(old) if old >> 32 == second => (old & 0xffff_ffff) + 1,
            _ => 1,
        };
        if count <= u64::from(self.settings.rate) {
            return Verdict::Send;
        }
        let over = self.over.fetch_add(1, Ordering::Relaxed) + 1;
        match self.settings.slip {
            0 => Verdict::Drop,
            slip if over.is_multiple_of(u64::from(slip)) => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }
}

/// `source` with only its first `v4` or `v6` bits.
fn prefix(source: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match source {
        IpAddr::V4(a) => IpNet::new(IpAddr::V4(a), v4).map_or(source, |n| n.network()),
        IpAddr::V6(a) => IpNet::new(IpAddr::V6(a), v6).map_or(source, |n| n.network()),
    }
}

/// The truncated form of an answer: its header with TC set and no records, then its question. `None` when the
/// question cannot be found (then the answer is dropped instead).
pub fn truncated(answer: &[u8]) -> Option<Vec<u8>> {
    use hickory_server::proto::{
        op::Message,
        serialize::binary::{BinDecodable, BinEncodable},
    };
    let mut message = Message::from_bytes(answer).ok()?;
    message.answers.clear();
    message.authorities.clear();
    message.additionals.clear();
    message.metadata.truncation = true;
    message.to_bytes().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, slip: u32) -> Limiter {
        Limiter::new(Settings { rate, slip, exempt: vec!["127.0.0.0/8".parse().expect("net")], ..Settings::default() })
    }

    #[test]
    fn a_prefix_gets_its_rate_per_name_then_every_second_answer_slips() {
        let rrl = limiter(5, 2);
        let a: IpAddr = "198.51.100.7".parse().expect("ip");
        let same_24: IpAddr = "198.51.100.200".parse().expect("ip");
        let verdicts: Vec<Verdict> =
            (0..9).map(|i| rrl.check(if i % 2 == 0 { a } else { same_24 }, b"\x03www", 0)).collect();
        assert_eq!(&verdicts[..5], &[Verdict::Send; 5]);
        assert_eq!(&verdicts[5..], &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]);
        // Another name, another prefix and the name in another case have budgets of their own or share it alike.
        assert_eq!(rrl.check(a, b"\x04mail", 0), Verdict::Send);
        assert_eq!(rrl.check("198.51.101.7".parse().expect("ip"), b"\x03www", 0), Verdict::Send);
        assert_ne!(rrl.check(a, b"\x03WWW", 0), Verdict::Send, "case does not make a new name");
        // Loopback is exempt.
        assert!((0..100).all(|_| rrl.check("127.0.0.1".parse().expect("ip"), b"\x03www", 0) == Verdict::Send));
    }

    #[test]
    fn errors_share_one_budget_whatever_the_name_and_v6_counts_by_56() {
        let rrl = limiter(3, 0);
        let v6 = |s: &str| s.parse::<IpAddr>().expect("ip");
        let names: Vec<Vec<u8>> = (0..6_u8).map(|i| vec![1, b'a' + i]).collect();
        let verdicts: Vec<Verdict> = names.iter().map(|n| rrl.check(v6("2001:db8:0:ff00::1"), n, 3)).collect();
        assert_eq!(
            verdicts,
            [Verdict::Send, Verdict::Send, Verdict::Send, Verdict::Drop, Verdict::Drop, Verdict::Drop]
        );
        // 2001:db8:0:ff00::/56 is the same prefix; 2001:db8:0:100::/56 is not.
        assert_eq!(rrl.check(v6("2001:db8:0:ffff::2"), b"\x01z", 3), Verdict::Drop);
        assert_eq!(rrl.check(v6("2001:db8:0:100::1"), b"\x01z", 3), Verdict::Send);
    }

    #[test]
    fn off_limits_nothing() {
        let rrl = Limiter::off();
        assert!((0..1000).all(|_| rrl.check("198.51.100.1".parse().expect("ip"), b"\x01a", 0) == Verdict::Send));
    }
}
