//! Choosing an NCU's primary and backup heartbeat servers: a pure function of the fleet table.
//!
//! Eligible servers are `active`, refreshed within the stale limit, below capacity and not reported failed by the
//! NCU. Among those whose load (relative to capacity) is within [`SLACK`] of the least loaded, the NCU gets the one
//! ranking highest for it by rendezvous hashing: every hds instance computes the same answer with no state of its
//! own, and an NCU keeps its servers while loads stay close. The backup is chosen the same way among servers on a
//! different host when there is one.

use std::time::Duration;

use sha2::{Digest, Sha256};

use tether_proto::hds::host_of as host;

/// How far above the least loaded server's load ratio a server may be and still be chosen for stability.
pub const SLACK: f64 = 0.10;

/// Operational state of a heartbeat server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetState {
    /// Takes new NCUs.
    Active,
    /// At capacity; takes none until below its low-water mark.
    Full,
    /// Being emptied by the operator.
    Draining,
}

/// One row of `heartbeat_servers`, as the choice sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Unique name.
    pub name: String,
    /// QUIC control address, `host:port`.
    pub address: String,
    /// Most NCU addresses it takes.
    pub capacity: u32,
    /// Addresses it carries now.
    pub load: u32,
    /// Its state.
    pub state: FleetState,
    /// Time since it last refreshed its row.
    pub age: Duration,
}

/// The servers handed to an NCU.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Register here.
    pub primary: Server,
    /// Move here when the primary stops.
    pub backup: Option<Server>,
}

/// No server can take the NCU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no active heartbeat server can take this NCU ({total} known, {eligible} eligible)")]
pub struct NoServer {
    /// Rows in the table.
    pub total: usize,
    /// Rows eligible before the NCU's failed list was applied.
    pub eligible: usize,
}

/// Picks the pair for the NCU identified by `ncu_key` (its certificate fingerprint).
pub fn choose(servers: &[Server], failed: &[String], stale_after: Duration, ncu_key: &[u8]) -> Result<Pair, NoServer> {
    let healthy: Vec<&Server> = servers
        .iter()
        .filter(|s| s.state == FleetState::Active && s.age <= stale_after && s.load < s.capacity && s.capacity > 0)
        .collect();
    // The NCU's failed list is a hint (one timeout under a storm is not a death), not a verdict: when it would rule
    // out every healthy server, the healthy ones are offered again rather than none.
    let mut eligible: Vec<&Server> = healthy.iter().copied().filter(|s| !failed.contains(&s.name)).collect();
    if eligible.is_empty() {
        eligible.clone_from(&healthy);
    }
    let Some(primary) = pick(&eligible, ncu_key) else {
        return Err(NoServer { total: servers.len(), eligible: healthy.len() });
    };
    let others: Vec<&Server> = eligible.iter().copied().filter(|s| s.name != primary.name).collect();
    let elsewhere: Vec<&Server> =
        others.iter().copied().filter(|s| host(&s.address) != host(&primary.address)).collect();
    let backup = pick(if elsewhere.is_empty() { &others } else { &elsewhere }, ncu_key);
    Ok(Pair { primary: primary.clone(), backup: backup.cloned() })
}

fn pick<'a>(candidates: &[&'a Server], ncu_key: &[u8]) -> Option<&'a Server> {
    let least = candidates.iter().map(|s| ratio(s)).fold(f64::INFINITY, f64::min);
    candidates
        .iter()
        .copied()
        .filter(|s| ratio(s) <= least + SLACK)
        .max_by(|a, b| rank(ncu_key, &a.name).cmp(&rank(ncu_key, &b.name)).then_with(|| b.name.cmp(&a.name)))
}

fn ratio(server: &Server) -> f64 {
    f64::from(server.load) / f64::from(server.capacity.max(1))
}

/// Rendezvous weight of `server` for this NCU.
fn rank(ncu_key: &[u8], server: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(ncu_key);
    hash.update([0]);
    hash.update(server.as_bytes());
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(15);

    fn server(name: &str, address: &str, capacity: u32, load: u32, state: FleetState, age: u64) -> Server {
        Server { name: name.into(), address: address.into(), capacity, load, state, age: Duration::from_secs(age) }
    }

    fn names(pair: &Pair) -> (String, Option<String>) {
        (pair.primary.name.clone(), pair.backup.as_ref().map(|b| b.name.clone()))
    }

    #[test]
    fn table() {
        use FleetState::*;
        struct Case {
            what: &'static str,
            fleet: Vec<Server>,
            failed: Vec<&'static str>,
            want: Result<(&'static str, Option<&'static str>), ()>,
        }
        let cases = vec![
            Case {
                what: "least loaded relative to capacity first, backup on another host",
                fleet: vec![
                    server("a", "10.0.0.1:4433", 100, 90, Active, 1),
                    server("b", "10.0.0.2:4433", 1000, 100, Active, 1),
                    server("c", "10.0.0.3:4433", 100, 50, Active, 1),
                ],
                failed: vec![],
                want: Ok(("b", Some("c"))),
            },
            Case {
                what: "full, draining, stale and at-capacity rows are never assigned",
                fleet: vec![
                    server("full", "10.0.0.1:1", 100, 0, Full, 1),
                    server("drain", "10.0.0.2:1", 100, 0, Draining, 1),
                    server("stale", "10.0.0.3:1", 100, 0, Active, 60),
                    server("capped", "10.0.0.4:1", 100, 100, Active, 1),
                    server("ok", "10.0.0.5:1", 100, 70, Active, 1),
                ],
                failed: vec![],
                want: Ok(("ok", None)),
            },
            Case {
                what: "servers the NCU reports failed are skipped",
                fleet: vec![
                    server("a", "10.0.0.1:1", 100, 0, Active, 1),
                    server("b", "10.0.0.2:1", 100, 50, Active, 1),
                    server("c", "10.0.0.3:1", 100, 60, Active, 1),
                ],
                failed: vec!["a"],
                want: Ok(("b", Some("c"))),
            },
            Case {
                what: "a backup on the same host only when no other host exists",
                fleet: vec![
                    server("a", "10.0.0.1:1", 100, 0, Active, 1),
                    server("a2", "10.0.0.1:2", 100, 50, Active, 1),
                ],
                failed: vec![],
                want: Ok(("a", Some("a2"))),
            },
            Case {
                what: "a failed list covering every healthy server is ignored rather than leaving the NCU with none",
                fleet: vec![
                    server("a", "10.0.0.1:1", 100, 0, Active, 1),
                    server("b", "10.0.0.2:1", 100, 50, Active, 1),
                    server("dead", "10.0.0.3:1", 100, 0, Active, 60),
                ],
                failed: vec!["a", "b"],
                want: Ok(("a", Some("b"))),
            },
            Case {
                what: "nothing eligible is an error",
                fleet: vec![server("a", "10.0.0.1:1", 100, 0, Draining, 1)],
                failed: vec![],
                want: Err(()),
            },
            Case { what: "empty fleet is an error", fleet: vec![], failed: vec![], want: Err(()) },
        ];
        for case in cases {
            let failed: Vec<String> = case.failed.iter().map(|s| (*s).to_owned()).collect();
            let got = choose(&case.fleet, &failed, STALE, b"ncu-1").map(|p| names(&p));
            let want = case.want.map(|(p, b)| (p.to_owned(), b.map(str::to_owned)));
            assert_eq!(got.map_err(|_| ()), want, "{}", case.what);
        }
    }

    #[test]
    fn stable_while_loads_stay_close_and_spread_across_ncus() {
        let fleet: Vec<Server> = (0..4)
            .map(|i| server(&format!("hbs-{i}"), &format!("10.0.0.{i}:1"), 1000, 100 + i * 10, FleetState::Active, 1))
            .collect();
        let mut primaries = std::collections::BTreeMap::new();
        for n in 0..200_u32 {
            let key = n.to_be_bytes();
            let first = choose(&fleet, &[], STALE, &key).expect("pair");
            // Loads move a little: the same NCU keeps its servers.
            let mut moved = fleet.clone();
            for s in &mut moved {
                s.load += 15;
            }
            assert_eq!(names(&choose(&moved, &[], STALE, &key).expect("pair")), names(&first));
            assert_ne!(Some(&first.primary.name), first.backup.as_ref().map(|b| &b.name));
            *primaries.entry(first.primary.name).or_insert(0) += 1;
        }
        assert_eq!(primaries.len(), 4, "NCUs spread over every server within the slack: {primaries:?}");
    }

    #[test]
    fn a_server_far_above_the_rest_is_left_out() {
        let fleet = vec![
            server("busy", "10.0.0.1:1", 100, 80, FleetState::Active, 1),
            server("idle", "10.0.0.2:1", 100, 10, FleetState::Active, 1),
        ];
        for n in 0..50_u32 {
            assert_eq!(choose(&fleet, &[], STALE, &n.to_be_bytes()).expect("pair").primary.name, "idle");
        }
    }

    #[test]
    fn hosts_parse() {
        assert_eq!(host("10.0.0.1:4433"), "10.0.0.1");
        assert_eq!(host("[fd00::1]:4433"), "fd00::1");
        assert_eq!(host("hbs.example.net:4433"), "hbs.example.net");
    }
}
