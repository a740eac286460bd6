//! Caps on concurrent flows per domain and per client address, shared by the TCP and UDP relays.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::metrics::Refusal;

/// Counts of running flows; one short lock per flow start and end, never per packet.
#[derive(Debug, Default)]
pub struct Limits {
    counts: Mutex<Counts>,
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
    domains: HashMap<i64, u32>,
    clients: HashMap<(i64, IpAddr), u32>,
}

impl Limits {
    /// Takes a place for a flow of `client` to `domain`, or says which cap is full.
    pub fn admit(self: &Arc<Self>, domain: i64, client: IpAddr, caps: Caps) -> Result<Permit, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let domain_flows = counts.domains.get(&domain).copied().unwrap_or(0);
        let client_flows = counts.clients.get(&(domain, client)).copied().unwrap_or(0);
        admit(domain_flows, client_flows, caps)?;
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
}
