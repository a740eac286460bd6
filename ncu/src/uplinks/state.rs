//! What the kernel says (links, addresses, default routes) and the pure functions that turn it into uplinks and
//! into the operations that bring the published set in line.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Kernel index.
    pub index: u32,
    /// Name, e.g. `wan1`.
    pub name: String,
    /// Administratively up and with carrier.
    pub up: bool,
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    /// Interface index.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Global scope, usable (not tentative, deprecated or failed duplicate detection).
    pub global: bool,
}

/// A default route (0.0.0.0/0 or ::/0) through an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultRoute {
    /// Interface index.
    pub index: u32,
    /// IPv6 rather than IPv4.
    pub v6: bool,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
}

/// One full reading of the kernel's tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Interfaces.
    pub links: Vec<Link>,
    /// Addresses.
    pub addrs: Vec<Addr>,
    /// Default routes of the main table.
    pub routes: Vec<DefaultRoute>,
}

/// Which interfaces are uplinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These interface names.
    Names(Vec<String>),
    /// Every interface with a default route (of the address's family).
    Auto,
}

/// An uplink the kernel offers: one global address on one interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    /// Stable uplink name: the interface name (`wan1`), `wan1-6` for its IPv6 address, `#n` for more.
    pub name: String,
    /// Interface name.
    pub interface: String,
    /// Interface index.
    pub index: u32,
    /// The address.
    pub address: IpAddr,
    /// The default route's next hop through this interface, for outbound spreading.
    pub gateway: Option<IpAddr>,
}

/// The uplinks the kernel offers now, in a stable order.
pub fn candidates(observed: &Observed, selection: &Selection) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut links: Vec<&Link> = observed.links.iter().filter(|l| l.up).collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    for link in links {
        let chosen = match selection {
            Selection::Names(names) => names.contains(&link.name),
            Selection::Auto => observed.routes.iter().any(|r| r.index == link.index),
        };
        if !chosen {
            continue;
        }
        for v6 in [false, true] {
            let route = observed.routes.iter().find(|r| r.index == link.index && r.v6 == v6);
            if *selection == Selection::Auto && route.is_none() {
                continue;
            }
            let mut ips: Vec<IpAddr> = observed
                .addrs
                .iter()
                .filter(|a| a.index == link.index && a.global && a.ip.is_ipv6() == v6)
                .map(|a| a.ip)
                .collect();
            ips.sort();
            ips.dedup();
            for (n, ip) in ips.into_iter().enumerate() {
                let base = if v6 { format!("{}-6", link.name) } else { link.name.clone() };
                let name = if n == 0 { base } else { format!("{base}#{n}") };
                out.push(Candidate {
                    name,
                    interface: link.name.clone(),
                    index: link.index,
                    address: ip,
                    gateway: route.and_then(|r| r.gateway),
                });
            }
        }
    }
    out
}

/// An uplink that failed validation (no Internet through it), retried with backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// What is being retried.
    pub candidate: Candidate,
    /// When to check next.
    pub due: Instant,
    /// The wait after the next failure.
    pub backoff: Duration,
}

/// What to do to bring the published uplinks in line with the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Published uplinks that vanished, or changed with nothing to validate in their place: withdraw at once.
    pub withdraw: Vec<String>,
    /// Published uplinks whose address changed and whose new address is validated now: withdrawn together with
    /// the replacement's publication, so the server sees one registration (one transaction) for the change.
    pub replace: Vec<String>,
    /// Uplinks to validate now (new, changed, or a retry that is due).
    pub validate: Vec<Candidate>,
    /// Retries whose uplink vanished: forget them.
    pub forget: Vec<String>,
}

/// Compares what the kernel offers with what is published and what is waiting for a retry.
pub fn reconcile(
    offered: &[Candidate],
    published: &BTreeMap<String, Candidate>,
    retries: &BTreeMap<String, Retry>,
    checking: &[String],
    now: Instant,
) -> Plan {
    let mut plan = Plan::default();
    for (name, retry) in retries {
        if !offered.contains(&retry.candidate) {
            plan.forget.push(name.clone());
        }
    }
    for candidate in offered {
        if published.get(&candidate.name) == Some(candidate) || checking.contains(&candidate.name) {
            continue;
        }
        match retries.get(&candidate.name) {
            Some(retry) if retry.candidate == *candidate && retry.due > now => {}
            _ => plan.validate.push(candidate.clone()),
        }
    }
    for (name, current) in published {
        if !offered.contains(current) {
            if plan.validate.iter().any(|c| &c.name == name) {
                plan.replace.push(name.clone());
            } else {
                plan.withdraw.push(name.clone());
            }
        }
    }
    plan
}

/// The wait before the next check of an uplink that failed after waiting `previous`.
pub fn next_backoff(previous: Duration, max: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_secs(1), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            links: vec![
                Link { index: 1, name: "lo".into(), up: true },
                Link { index: 2, name: "wan1".into(), up: true },
                Link { index: 3, name: "wan2".into(), up: true },
                Link { index: 4, name: "lan".into(), up: true },
                Link { index: 5, name: "wan3".into(), up: false },
            ],
            addrs: vec![
                Addr { index: 1, ip: "127.0.0.1".parse().expect("ip"), global: false },
                Addr { index: 2, ip: "198.18.1.2".parse().expect("ip"), global: true },
                Addr { index: 2, ip: "fd00:1::2".parse().expect("ip"), global: true },
                Addr { index: 2, ip: "fe80::1".parse().expect("ip"), global: false },
                Addr { index: 3, ip: "198.18.2.2".parse().expect("ip"), global: true },
                Addr { index: 3, ip: "198.18.2.3".parse().expect("ip"), global: true },
                Addr { index: 4, ip: "192.0.2.1".parse().expect("ip"), global: true },
                Addr { index: 5, ip: "198.18.3.2".parse().expect("ip"), global: true },
            ],
            routes: vec![
                DefaultRoute { index: 2, v6: false, gateway: Some("198.18.1.1".parse().expect("ip")) },
                DefaultRoute { index: 2, v6: true, gateway: Some("fd00:1::1".parse().expect("ip")) },
                DefaultRoute { index: 3, v6: false, gateway: Some("198.18.2.1".parse().expect("ip")) },
                DefaultRoute { index: 5, v6: false, gateway: Some("198.18.3.1".parse().expect("ip")) },
            ],
        }
    }

    fn names(list: &[Candidate]) -> Vec<(String, String)> {
        list.iter().map(|c| (c.name.clone(), c.address.to_string())).collect()
    }

    #[test]
    fn auto_takes_global_addresses_of_interfaces_with_a_default_route_of_their_family() {
        let got = names(&candidates(&observed(), &Selection::Auto));
        let want = [("wan1", "198.18.1.2"), ("wan1-6", "fd00:1::2"), ("wan2", "198.18.2.2"), ("wan2#1", "198.18.2.3")];
        assert_eq!(got, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    }

    #[test]
    fn named_interfaces_need_no_default_route_but_must_be_up() {
        let got = names(&candidates(&observed(), &Selection::Names(vec!["lan".into(), "wan3".into()])));
        assert_eq!(got, [("lan".to_owned(), "192.0.2.1".to_owned())]);
    }

    #[test]
    fn fifteen_uplinks_and_more_are_offered() {
        let mut o = Observed::default();
        for i in 0..16_u32 {
            o.links.push(Link { index: 10 + i, name: format!("wan{i:02}"), up: true });
            o.addrs.push(Addr { index: 10 + i, ip: format!("198.18.{i}.2").parse().expect("ip"), global: true });
            o.routes.push(DefaultRoute { index: 10 + i, v6: false, gateway: None });
        }
        assert_eq!(candidates(&o, &Selection::Auto).len(), 16);
    }

    #[test]
    fn reconcile_withdraws_vanished_and_changed_and_validates_new_ones() {
        let now = Instant::now();
        let offered = candidates(&observed(), &Selection::Auto);
        let mut published = BTreeMap::new();
        published.insert("wan1".to_owned(), offered[0].clone());
        let mut moved = offered[2].clone();
        moved.address = "198.18.2.99".parse().expect("ip");
        published.insert("wan2".to_owned(), moved);
        let gone = Candidate {
            name: "wan9".into(),
            interface: "wan9".into(),
            index: 9,
            address: "198.18.9.2".parse().expect("ip"),
            gateway: None,
        };
        published.insert("wan9".to_owned(), gone);
        let plan = reconcile(&offered, &published, &BTreeMap::new(), &[], now);
        assert_eq!(plan.withdraw, ["wan9"], "vanished: withdrawn at once");
        assert_eq!(plan.replace, ["wan2"], "a new address on wan2: withdrawn with its replacement");
        let validate: Vec<&str> = plan.validate.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(validate, ["wan1-6", "wan2", "wan2#1"]);
        // While the new address is being checked already, the old one goes at once.
        let plan = reconcile(&offered, &published, &BTreeMap::new(), &["wan2".to_owned()], now);
        assert_eq!(plan.withdraw, ["wan2", "wan9"]);
        assert!(plan.replace.is_empty());
        // A new address still waiting for its retry is not validated now: the old one goes at once.
        let mut retries = BTreeMap::new();
        let waiting = offered.iter().find(|c| c.name == "wan2").expect("wan2").clone();
        retries.insert(
            "wan2".to_owned(),
            Retry { candidate: waiting, due: now + Duration::from_secs(5), backoff: Duration::from_secs(2) },
        );
        let plan = reconcile(&offered, &published, &retries, &[], now);
        assert_eq!(plan.withdraw, ["wan2", "wan9"]);
    }

    #[test]
    fn retries_wait_for_their_time_and_vanish_with_their_uplink() {
        let now = Instant::now();
        let offered = candidates(&observed(), &Selection::Auto);
        let mut retries = BTreeMap::new();
        retries.insert(
            "wan1".to_owned(),
            Retry { candidate: offered[0].clone(), due: now + Duration::from_secs(5), backoff: Duration::from_secs(2) },
        );
        let mut stale = offered[2].clone();
        stale.name = "old".into();
        stale.address = "198.18.7.7".parse().expect("ip");
        retries.insert("old".to_owned(), Retry { candidate: stale, due: now, backoff: Duration::from_secs(1) });
        let plan = reconcile(&offered, &BTreeMap::new(), &retries, &["wan2".to_owned()], now);
        let validate: Vec<&str> = plan.validate.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(validate, ["wan1-6", "wan2#1"], "wan1 waits, wan2 is being checked");
        assert_eq!(plan.forget, ["old"]);
        let later = reconcile(&offered, &BTreeMap::new(), &retries, &[], now + Duration::from_secs(6));
        assert!(later.validate.iter().any(|c| c.name == "wan1"), "a due retry is validated");
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        assert_eq!(next_backoff(Duration::ZERO, Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(next_backoff(Duration::from_secs(4), Duration::from_secs(60)), Duration::from_secs(8));
        assert_eq!(next_backoff(Duration::from_secs(40), Duration::from_secs(60)), Duration::from_secs(60));
    }
}
