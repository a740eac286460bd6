//! Caps on concurrent flows per domain, per client and in all, shared by the TCP and UDP relays. A client is an IPv4
//! address or an IPv6 /64 (one subscriber line holds a whole /64, so per address would be no cap); the forwarder's
//! own cap on all flows bounds what every subscriber's settings together may ask.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::metrics::Refusal;

/// Counts of running flows; one short lock per flow start and end, never per packet.
#[derive(Debug)]
pub struct Limits {
    counts: Mutex<Counts>,
    max_total: u32,
}

impl Default for Limits {
    /// No cap on all flows.
    fn default() -> Self {
        Self::new(u32::MAX)
    }
}

/// A running flow's place under the caps, given back on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    domain: i64,
    client: IpAddr,
}

/// The caps of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most flows of the domain.
    pub max_flows: u32,
    /// Most flows of one client address.
    pub max_flows_per_client: u32,
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    domains: HashMap<i64, u32>,
    clients: HashMap<(i64, IpAddr), u32>,
}

/// Who a cap counts as one client: an IPv4 address (IPv4-mapped ones too), or an IPv6 address's /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

impl Limits {
    /// At most `max_total` flows in all.
    pub fn new(max_total: u32) -> Self {
        Self { counts: Mutex::default(), max_total }
    }

    /// Takes a place for a flow of `client` to `domain`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, domain: i64, client: IpAddr, caps: Caps) -> Result<Permit, Refusal> {
        let client = client_key(client);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.total >= self.max_total {
            return Err(Refusal::GlobalCap);
        }
        let domain_flows = counts.domains.get(&domain).copied().unwrap_or(0);
        let client_flows = counts.clients.get(&(domain, client)).copied().unwrap_or(0);
        admit(domain_flows, client_flows, caps)?;
        counts.total += 1;
        *counts.domains.entry(domain).or_default() += 1;
        *counts.clients.entry((domain, client)).or_default() += 1;
        Ok(Permit { limits: self.clone(), domain, client })
    }

    /// Flows running for `domain`.
    pub fn domain_flows(&self, domain: i64) -> u32 {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner).domains.get(&domain).copied().unwrap_or(0)
    }
}

/// The decision alone: may one more flow start?
pub fn admit(domain_flows: u32, client_flows: u32, caps: Caps) -> Result<(), Refusal> {
    if domain_flows >= caps.max_flows {
        Err(Refusal::DomainCap)
    } else if client_flows >= caps.max_flows_per_client {
        Err(Refusal::ClientCap)
    } else {
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        release(&mut counts.domains, self.domain);
        release(&mut counts.clients, (self.domain, self.client));
    }
}

/// Decrements a count, dropping it at zero so the maps hold only running flows.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { max_flows: 3, max_flows_per_client: 2 };

    #[test]
    fn the_decision_names_the_full_cap() {
        assert_eq!(admit(0, 0, CAPS), Ok(()));
        assert_eq!(admit(2, 2, CAPS), Err(Refusal::ClientCap));
        assert_eq!(admit(3, 0, CAPS), Err(Refusal::DomainCap));
    }

    #[test]
    fn permits_count_and_give_back() {
        let limits = Arc::new(Limits::default());
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        let p1 = limits.admit(1, a, CAPS).expect("first");
        let _p2 = limits.admit(1, a, CAPS).expect("second");
        assert_eq!(limits.admit(1, a, CAPS).err(), Some(Refusal::ClientCap));
        let _p3 = limits.admit(1, b, CAPS).expect("other client");
        assert_eq!(limits.admit(1, b, CAPS).err(), Some(Refusal::DomainCap));
        assert!(limits.admit(2, b, CAPS).is_ok(), "other domains have their own caps");
        drop(p1);
        assert_eq!(limits.domain_flows(1), 2);
        assert!(limits.admit(1, a, CAPS).is_ok());
        drop(_p2);
        assert!(limits.counts.lock().expect("lock").clients.len() <= 2);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_client_and_the_forwarder_has_its_own_cap() {
        let limits = Arc::new(Limits::new(4));
        let v6 = |s: &str| s.parse::<IpAddr>().expect("ip");
        let _a = limits.admit(1, v6("2001:db8:1:2::1"), CAPS).expect("first");
        let _b = limits.admit(1, v6("2001:db8:1:2:ffff::9"), CAPS).expect("same /64, second");
        assert_eq!(
            limits.admit(1, v6("2001:db8:1:2::77"), CAPS).err(),
            Some(Refusal::ClientCap),
            "a /64 is one client"
        );
        let _c = limits.admit(1, v6("2001:db8:1:3::1"), CAPS).expect("another /64");
        assert_eq!(client_key(v6("::ffff:192.0.2.7")), v6("192.0.2.7"));
        let _d = limits.admit(2, v6("192.0.2.7"), CAPS).expect("fourth in all");
        assert_eq!(
            limits.admit(3, v6("192.0.2.8"), CAPS).err(),
            Some(Refusal::GlobalCap),
            "whatever the domain allows"
        );
        drop(_d);
        assert!(limits.admit(3, v6("192.0.2.8"), CAPS).is_ok());
    }
}
