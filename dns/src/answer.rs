//! Which addresses a name answers, in what order and share: a pure function of the domain's rows.
//!
//! Per address family: the live addresses of the best (lowest) priority; an address whose reported load is far above
//! the average of that set is held back (the clustered-DNS seed); weights set each address's share of first place.
//! When nothing of any family is live, the fallback address answers; without one, `when_empty` decides.

use std::net::IpAddr;

/// Longest rotation schedule; larger weight sums are scaled down to fit.
pub const MAX_SCHEDULE: usize = 1024;

/// Liveness of an address, as heartbeat servers (or the admin API) record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Registered, ownership not yet proven; never answered.
    Pending,
    /// Answering heartbeats.
    Live,
    /// Stopped answering.
    Dead,
}

/// What to answer when no address of the domain is live and there is no fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenEmpty {
    /// An empty answer (NOERROR, no records).
    #[default]
    NoData,
    /// The dead addresses, by the same rules as live ones; pending ones never.
    LastKnown,
}

/// One row of `addresses`, as the answer rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Address {
    /// The published address.
    pub ip: IpAddr,
    /// Lower is preferred; higher priorities are backups.
    pub priority: u32,
    /// Relative share of first place among equals.
    pub weight: u32,
    /// Load last reported by the address's NCU or check.
    pub load: f32,
    /// Liveness.
    pub state: State,
}

/// The per-domain settings that shape answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Answered when nothing is live.
    pub fallback: Option<IpAddr>,
    /// Answered when nothing is live and there is no fallback.
    pub when_empty: WhenEmpty,
    /// An address whose load exceeds the set's average by this many percent is held back.
    pub load_threshold_pct: u32,
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A records.
    V4,
    /// AAAA records.
    V6,
}

/// The addresses one family answers, with their weights, in base order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Addresses in base order (rotation 0).
    pub ips: Vec<IpAddr>,
    /// Weight of each address, same order.
    pub weights: Vec<u32>,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// Chooses the addresses answered for `family`.
pub fn select(addresses: &[Address], policy: &Policy, family: Family) -> Selection {
    let any_live = addresses.iter().any(|a| a.state == State::Live);
    if any_live {
        return best_of(addresses, family, State::Live, policy.load_threshold_pct);
    }
    if let Some(fallback) = policy.fallback {
        if Family::of(&fallback) == family {
            return Selection { ips: vec![fallback], weights: vec![1] };
        }
        return Selection::default();
    }
    match policy.when_empty {
        WhenEmpty::NoData => Selection::default(),
        WhenEmpty::LastKnown => best_of(addresses, family, State::Dead, policy.load_threshold_pct),
    }
}

/// The order in which rotations are served: entry `i` of the schedule names the address that comes first on the
/// `i`-th query. Smooth weighted round robin, so heavy addresses are spread out rather than served in bursts.
pub fn schedule(weights: &[u32]) -> Vec<u16> {
    if weights.is_empty() {
        return Vec::new();
    }
    let weights = scaled(weights);
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0_i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(MAX_SCHEDULE));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += i64::from(*w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(u16::try_from(best).unwrap_or(u16::MAX));
    }
    out
}

fn best_of(addresses: &[Address], family: Family, state: State, threshold_pct: u32) -> Selection {
    let candidates = || addresses.iter().filter(move |a| a.state == state && Family::of(&a.ip) == family);
    let Some(best) = candidates().map(|a| a.priority).min() else {
        return Selection::default();
    };
    let mut chosen: Vec<&Address> = candidates().filter(|a| a.priority == best).collect();
    hold_back_overloaded(&mut chosen, threshold_pct);
    chosen.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.ip.cmp(&b.ip)));
    Selection { ips: chosen.iter().map(|a| a.ip).collect(), weights: chosen.iter().map(|a| a.weight.max(1)).collect() }
}

/// Drops addresses whose load is more than `threshold_pct` above the set's average; one at or below the average
/// always remains, so the set never empties.
fn hold_back_overloaded(chosen: &mut Vec<&Address>, threshold_pct: u32) {
    if chosen.len() < 2 {
        return;
    }
    let average = chosen.iter().map(|a| f64::from(a.load)).sum::<f64>() / chosen.len() as f64;
    if average <= 0.0 {
        return;
    }
    let limit = average * (1.0 + f64::from(threshold_pct) / 100.0);
    chosen.retain(|a| f64::from(a.load) <= limit);
}

fn scaled(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    let cap = MAX_SCHEDULE.max(weights.len()) as u64;
    if total <= cap {
        return weights.iter().map(|&w| w.max(1)).collect();
    }
    weights.iter().map(|&w| u32::try_from((u64::from(w.max(1)) * cap / total).max(1)).unwrap_or(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, priority: u32, weight: u32, load: f32, state: State) -> Address {
        Address { ip: ip.parse().expect("test ip"), priority, weight, load, state }
    }

    fn policy() -> Policy {
        Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 }
    }

    fn ips(s: &Selection) -> Vec<String> {
        s.ips.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn only_live_addresses_of_the_family() {
        let rows = [
            addr("198.18.0.1", 0, 1, 0.0, State::Live),
            addr("198.18.0.2", 0, 1, 0.0, State::Pending),
            addr("198.18.0.3", 0, 1, 0.0, State::Dead),
            addr("fd00::1", 0, 1, 0.0, State::Live),
        ];
        assert_eq!(ips(&select(&rows, &policy(), Family::V4)), ["198.18.0.1"]);
        assert_eq!(ips(&select(&rows, &policy(), Family::V6)), ["fd00::1"]);
    }

    #[test]
    fn backups_only_while_no_primary_is_live() {
        let mut rows = vec![addr("198.18.0.1", 0, 1, 0.0, State::Live), addr("198.18.0.9", 10, 1, 0.0, State::Live)];
        assert_eq!(ips(&select(&rows, &policy(), Family::V4)), ["198.18.0.1"]);
        rows[0].state = State::Dead;
        assert_eq!(ips(&select(&rows, &policy(), Family::V4)), ["198.18.0.9"]);
    }

    #[test]
    fn fallback_when_nothing_is_live() {
        let rows = [addr("198.18.0.1", 0, 1, 0.0, State::Dead)];
        let p = Policy { fallback: Some("198.18.9.9".parse().expect("ip")), ..policy() };
        assert_eq!(ips(&select(&rows, &p, Family::V4)), ["198.18.9.9"]);
        assert!(select(&rows, &p, Family::V6).ips.is_empty());
        assert!(select(&rows, &policy(), Family::V4).ips.is_empty());
    }

    #[test]
    fn fallback_not_used_while_another_family_is_live() {
        let rows = [addr("fd00::1", 0, 1, 0.0, State::Live)];
        let p = Policy { fallback: Some("198.18.9.9".parse().expect("ip")), ..policy() };
        assert!(select(&rows, &p, Family::V4).ips.is_empty());
    }

    #[test]
    fn last_known_answers_dead_never_pending() {
        let rows = [addr("198.18.0.1", 0, 1, 0.0, State::Dead), addr("198.18.0.2", 0, 1, 0.0, State::Pending)];
        let p = Policy { when_empty: WhenEmpty::LastKnown, ..policy() };
        assert_eq!(ips(&select(&rows, &p, Family::V4)), ["198.18.0.1"]);
    }

    #[test]
    fn overloaded_address_is_held_back() {
        let rows = [
            addr("198.18.0.1", 0, 1, 10.0, State::Live),
            addr("198.18.0.2", 0, 1, 12.0, State::Live),
            addr("198.18.0.3", 0, 1, 90.0, State::Live),
        ];
        // average 37.3, limit 56: .3 is held back.
        assert_eq!(ips(&select(&rows, &policy(), Family::V4)), ["198.18.0.1", "198.18.0.2"]);
        let lenient = Policy { load_threshold_pct: 200, ..policy() };
        assert_eq!(select(&rows, &lenient, Family::V4).ips.len(), 3);
    }

    #[test]
    fn heavier_weights_come_first() {
        let rows = [addr("198.18.0.1", 0, 1, 0.0, State::Live), addr("198.18.0.2", 0, 3, 0.0, State::Live)];
        let s = select(&rows, &policy(), Family::V4);
        assert_eq!(ips(&s), ["198.18.0.2", "198.18.0.1"]);
        assert_eq!(s.weights, [3, 1]);
    }

    #[test]
    fn schedule_gives_each_its_weight_spread_out() {
        let s = schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(s, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(schedule(&[1, 1, 1]), [0, 1, 2]);
        assert!(schedule(&[]).is_empty());
    }

    #[test]
    fn schedule_is_bounded_and_keeps_every_address() {
        let s = schedule(&[65535, 1, 65535]);
        assert!(s.len() <= MAX_SCHEDULE + 3, "{}", s.len());
        for i in 0..3 {
            assert!(s.contains(&i), "address {i} missing");
        }
    }
}
