//! The target table: what each static address, port and protocol relays to, and the pure choice of a target.
//!
//! Built from Postgres rows ([`DomainRow`]) by the sync task and swapped in whole; flows read it lock-free. Each
//! entry is a [`Entry::Forward`] today; host migration ("old address → migration server") will be one more kind.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP: one flow per connection.
    Tcp,
    /// UDP: one flow per client address.
    Udp,
}

/// Where a listener sits: static address, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The domain's static address.
    pub ip: IpAddr,
    /// The port clients connect to.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// How a domain spreads new flows over its live addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active flows per unit of weight; ties by weighted round robin.
    LeastConnections,
}

/// Whether the site's server gets a PROXY protocol v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// No header.
    #[default]
    Off,
    /// A header at the start of each TCP connection.
    Tcp,
    /// TCP as above, and a header in front of every UDP datagram.
    TcpUdp,
}

/// A domain as read from Postgres: the input of [`Table::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainRow {
    /// Primary key.
    pub id: i64,
    /// Name without the trailing dot, for logs and metrics.
    pub name: String,
    /// The address the forwarder listens on.
    pub static_ip: IpAddr,
    /// Where flows go when nothing is live.
    pub fallback: Option<IpAddr>,
    /// The per-domain port list (TCP and UDP); empty: the service tuples decide.
    pub ports: Vec<u16>,
    /// The service tuples' transports and ports.
    pub services: Vec<(Protocol, u16)>,
    /// Spreading policy.
    pub policy: Policy,
    /// PROXY protocol mode.
    pub proxy: ProxyMode,
    /// Most concurrent flows of the domain.
    pub max_flows: u32,
    /// Most concurrent flows of one client address.
    pub max_flows_per_client: u32,
    /// The live addresses.
    pub addresses: Vec<AddressRow>,
}

/// A live address of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRow {
    /// The published address.
    pub ip: IpAddr,
    /// Lower is preferred.
    pub priority: u32,
    /// Share among equals.
    pub weight: u32,
    /// Takes no new flows; its running flows go on (a host migration's old address).
    pub draining: bool,
}

/// What a listener relays to.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The domain's live addresses, on `port`. (A host migration's redirect of its old address is the kernel's:
    /// see [`tether_nft`]; here its old address only stops taking new flows.)
    Forward {
        /// The domain.
        domain: Arc<Domain>,
        /// The port connected to on the chosen address.
        port: u16,
    },
}

/// A domain compiled for the flow path.
#[derive(Debug)]
pub struct Domain {
    /// The row it was built from; an unchanged row keeps its `Domain` (and its round-robin state) across reloads.
    pub row: DomainRow,
    /// Live addresses by priority, then address; never the static address itself.
    pub targets: Vec<Target>,
    /// Smooth weighted round-robin state, one slot per target.
    current: Mutex<Vec<i64>>,
}

/// One live address and the flows running to it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address.
    pub ip: IpAddr,
    /// Lower is preferred.
    pub priority: u32,
    /// Share among equals.
    pub weight: u32,
    /// Takes no new flows.
    pub draining: bool,
    /// Shared with the flows; outlives reloads while the address stays live.
    pub state: Arc<TargetState>,
}

/// The flows of one (domain, address): a count for least-connections and the token that closes them all.
#[derive(Debug, Default)]
pub struct TargetState {
    active: AtomicU32,
    cancel: CancellationToken,
}

/// Counts a flow to a target while alive.
#[derive(Debug)]
pub struct ActiveGuard(Arc<TargetState>);

/// The whole table.
#[derive(Debug, Default)]
pub struct Table {
    domains: BTreeMap<i64, Arc<Domain>>,
    entries: HashMap<Key, Entry>,
    conflicts: Vec<Conflict>,
}

/// Two domains claiming the same listener; the lower id keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The listener.
    pub key: Key,
    /// The domain serving it.
    pub kept: String,
    /// The domain left out.
    pub refused: String,
}

/// Inputs of [`select`] for one target.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Lower is preferred.
    pub priority: u32,
    /// Share among equals.
    pub weight: u32,
    /// Flows running to it.
    pub active: u32,
    /// Already tried for this flow, or otherwise out.
    pub excluded: bool,
}

impl Table {
    /// An empty table.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The table for `rows`, carrying over target states (and unchanged domains) from `previous`. Also returns the
    /// states of targets that are gone, whose flows must be closed.
    pub fn build(rows: Vec<DomainRow>, previous: &Self) -> (Self, Vec<Arc<TargetState>>) {
        let mut domains = BTreeMap::new();
        for row in rows {
            let domain = compile(row, previous);
            domains.insert(domain.row.id, domain);
        }
        let removed = removed_targets(&previous.domains, &domains, None);
        (Self::index(domains), removed)
    }

    /// The table with the domains in `changes` replaced (`Some`) or removed (`None`), sharing every other domain.
    pub fn with_changes(&self, changes: Vec<(i64, Option<DomainRow>)>) -> (Self, Vec<Arc<TargetState>>) {
        let mut domains = self.domains.clone();
        let mut touched = BTreeSet::new();
        for (id, row) in changes {
            touched.insert(id);
            match row {
                Some(row) => {
                    domains.insert(id, compile(row, self));
                }
                None => {
                    domains.remove(&id);
                }
            }
        }
        let removed = removed_targets(&self.domains, &domains, Some(&touched));
        (Self::index(domains), removed)
    }

    /// What the listener at `key` relays to.
    pub fn get(&self, key: &Key) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Every listener the table wants, in order.
    pub fn keys(&self) -> BTreeSet<Key> {
        self.entries.keys().copied().collect()
    }

    /// Domains in the table.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Listeners claimed by two domains in the last build.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    fn index(domains: BTreeMap<i64, Arc<Domain>>) -> Self {
        let mut entries: HashMap<Key, Entry> = HashMap::new();
        let mut conflicts = Vec::new();
        // In id order, so the older domain keeps a contested listener whatever the reload order.
        for domain in domains.values() {
            for (protocol, port) in domain.row.listen_ports() {
                let key = Key { ip: domain.row.static_ip, port, protocol };
                match entries.get(&key) {
                    Some(Entry::Forward { domain: kept, .. }) => {
                        conflicts.push(Conflict { key, kept: kept.row.name.clone(), refused: domain.row.name.clone() })
                    }
                    None => {
                        entries.insert(key, Entry::Forward { domain: domain.clone(), port });
                    }
                }
            }
        }
        Self { domains, entries, conflicts }
    }
}

/// Compiles a row, reusing the previous `Domain` when the row is unchanged and the target states by address.
fn compile(row: DomainRow, previous: &Table) -> Arc<Domain> {
    let before = previous.domains.get(&row.id);
    if let Some(before) = before
        && before.row == row
    {
        return before.clone();
    }
    let mut targets: Vec<Target> = row
        .addresses
        .iter()
        .filter(|a| a.ip != row.static_ip && a.weight > 0)
        .map(|a| {
            let state = before
                .and_then(|b| b.targets.iter().find(|t| t.ip == a.ip))
                .map_or_else(|| Arc::new(TargetState::default()), |t| t.state.clone());
            Target { ip: a.ip, priority: a.priority, weight: a.weight, draining: a.draining, state }
        })
        .collect();
    targets.sort_by_key(|t| (t.priority, t.ip));
    targets.dedup_by(|a, b| a.ip == b.ip);
    let current = Mutex::new(vec![0; targets.len()]);
    Arc::new(Domain { row, targets, current })
}

/// Target states present in `before` but not in `after` (only for the `touched` domains, when given).
fn removed_targets(
    before: &BTreeMap<i64, Arc<Domain>>,
    after: &BTreeMap<i64, Arc<Domain>>,
    touched: Option<&BTreeSet<i64>>,
) -> Vec<Arc<TargetState>> {
    let mut removed = Vec::new();
    for (id, old) in before {
        if touched.is_some_and(|t| !t.contains(id)) {
            continue;
        }
        let new = after.get(id);
        for target in &old.targets {
            let kept = new.is_some_and(|n| n.targets.iter().any(|t| Arc::ptr_eq(&t.state, &target.state)));
            if !kept {
                removed.push(target.state.clone());
            }
        }
    }
    removed
}

impl DomainRow {
    /// The listeners this domain wants: each listed port on TCP and UDP, else each service tuple's port.
    pub fn listen_ports(&self) -> BTreeSet<(Protocol, u16)> {
        if self.ports.is_empty() {
            self.services.iter().copied().filter(|(_, port)| *port != 0).collect()
        } else {
            self.ports.iter().filter(|p| **p != 0).flat_map(|p| [(Protocol::Tcp, *p), (Protocol::Udp, *p)]).collect()
        }
    }
}

impl Domain {
    /// Chooses a target for a new flow, skipping `tried`; `None` when no live address is left.
    pub fn choose(&self, tried: &[IpAddr]) -> Option<&Target> {
        let candidates: Vec<Candidate> = self
            .targets
            .iter()
            .map(|t| Candidate {
                priority: t.priority,
                weight: t.weight,
                active: t.state.active(),
                excluded: t.draining || tried.contains(&t.ip) || t.state.is_closed(),
            })
            .collect();
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        select(self.row.policy, &candidates, &mut current).and_then(|i| self.targets.get(i))
    }
}

impl TargetState {
    /// Flows running to the target.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a flow until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// A token cancelled when the target leaves the live set.
    pub fn flow_token(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// Closes every flow to the target.
    pub fn close(&self) {
        self.cancel.cancel();
    }

    /// True once the target has left the live set.
    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks a candidate: the best priority among those not excluded, then by `policy`. `current` is the smooth
/// weighted round-robin state (one slot per candidate), updated in place.
pub fn select(policy: Policy, candidates: &[Candidate], current: &mut [i64]) -> Option<usize> {
    let best = candidates.iter().filter(|c| !c.excluded).map(|c| c.priority).min()?;
    let mut eligible: Vec<usize> =
        (0..candidates.len()).filter(|&i| !candidates[i].excluded && candidates[i].priority == best).collect();
    if policy == Policy::LeastConnections {
        // Lowest active/weight, compared by cross-multiplication.
        let load = |i: usize| (u64::from(candidates[i].active), u64::from(candidates[i].weight.max(1)));
        let (na, wa) = eligible.iter().map(|&i| load(i)).min_by(|(a1, w1), (a2, w2)| (a1 * w2).cmp(&(a2 * w1)))?;
        eligible.retain(|&i| {
            let (n, w) = load(i);
            n * wa == na * w
        });
    }
    smooth_weighted(candidates, &eligible, current)
}

/// One step of nginx's smooth weighted round robin over `eligible`.
fn smooth_weighted(candidates: &[Candidate], eligible: &[usize], current: &mut [i64]) -> Option<usize> {
    let mut total = 0_i64;
    let mut chosen: Option<usize> = None;
    for &i in eligible {
        let weight = i64::from(candidates[i].weight.max(1));
        *current.get_mut(i)? += weight;
        total += weight;
        if chosen.is_none_or(|c| current[i] > current[c]) {
            chosen = Some(i);
        }
    }
    let chosen = chosen?;
    current[chosen] -= total;
    Some(chosen)
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{protocol}/{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "{protocol}/[{ip}]:{}", self.port),
        }
    }
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl ProxyMode {
    /// True when TCP connections get a header.
    pub fn tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::TcpUdp)
    }

    /// True when UDP datagrams get a header.
    pub fn udp(self) -> bool {
        matches!(self, Self::TcpUdp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    fn row(id: i64, addresses: &[(u8, u32, u32)]) -> DomainRow {
        DomainRow {
            id,
            name: format!("d{id}.example"),
            static_ip: IpAddr::from([203, 0, 113, 1]),
            fallback: None,
            ports: vec![443],
            services: vec![],
            policy: Policy::RoundRobin,
            proxy: ProxyMode::Off,
            max_flows: 10,
            max_flows_per_client: 2,
            addresses: addresses
                .iter()
                .map(|&(last, priority, weight)| AddressRow { ip: ip(last), priority, weight, draining: false })
                .collect(),
        }
    }

    fn cand(priority: u32, weight: u32, active: u32) -> Candidate {
        Candidate { priority, weight, active, excluded: false }
    }

    fn picks(policy: Policy, candidates: &[Candidate], n: usize) -> Vec<usize> {
        let mut current = vec![0; candidates.len()];
        (0..n).map(|_| select(policy, candidates, &mut current).expect("a pick")).collect()
    }

    #[test]
    fn smooth_round_robin_follows_weights_evenly() {
        let c = [cand(0, 5, 0), cand(0, 1, 0), cand(0, 1, 0)];
        assert_eq!(picks(Policy::RoundRobin, &c, 7), [0, 0, 1, 0, 2, 0, 0]);
        let c = [cand(0, 1, 0), cand(0, 1, 0)];
        assert_eq!(picks(Policy::RoundRobin, &c, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn only_the_best_priority_is_used_until_it_is_excluded() {
        let mut c = [cand(1, 1, 0), cand(0, 1, 0), cand(0, 1, 0)];
        assert_eq!(picks(Policy::RoundRobin, &c, 4), [1, 2, 1, 2]);
        c[1].excluded = true;
        c[2].excluded = true;
        assert_eq!(picks(Policy::RoundRobin, &c, 2), [0, 0]);
        c[0].excluded = true;
        assert_eq!(select(Policy::RoundRobin, &c, &mut [0; 3]), None);
        assert_eq!(select(Policy::RoundRobin, &[], &mut []), None);
    }

    #[test]
    fn least_connections_weighs_active_flows() {
        // 4 flows on weight 2 is as loaded as 2 on weight 1; 1 on weight 1 is lighter.
        let c = [cand(0, 2, 4), cand(0, 1, 2), cand(0, 1, 1)];
        assert_eq!(picks(Policy::LeastConnections, &c, 3), [2, 2, 2]);
        // Ties rotate by weight.
        let c = [cand(0, 1, 3), cand(0, 1, 3)];
        assert_eq!(picks(Policy::LeastConnections, &c, 4), [0, 1, 0, 1]);
    }

    #[test]
    fn ports_come_from_the_list_or_the_service_tuples() {
        let mut r = row(1, &[]);
        r.ports = vec![80, 443];
        let ports: Vec<_> = r.listen_ports().into_iter().collect();
        assert_eq!(ports, [(Protocol::Tcp, 80), (Protocol::Tcp, 443), (Protocol::Udp, 80), (Protocol::Udp, 443)]);
        r.ports = vec![];
        r.services = vec![(Protocol::Udp, 53), (Protocol::Tcp, 53), (Protocol::Tcp, 0)];
        let ports: Vec<_> = r.listen_ports().into_iter().collect();
        assert_eq!(ports, [(Protocol::Tcp, 53), (Protocol::Udp, 53)]);
    }

    #[test]
    fn reloads_keep_target_states_and_report_removed_ones() {
        let (t1, removed) = Table::build(vec![row(1, &[(1, 0, 1), (2, 0, 1)]), row(2, &[(9, 0, 1)])], &Table::empty());
        assert!(removed.is_empty());
        let key = Key { ip: IpAddr::from([203, 0, 113, 1]), port: 443, protocol: Protocol::Tcp };
        let Some(Entry::Forward { domain, port }) = t1.get(&key) else { panic!("entry for {key}") };
        assert_eq!((domain.row.id, *port), (1, 443), "the older domain keeps a contested listener");
        assert_eq!(t1.conflicts().len(), 2, "tcp and udp both contested");
        let state_1 = domain.targets[0].state.clone();
        let _flow = state_1.enter();

        // Address .2 dies: .1 keeps its state (and its flow count), .2's state is reported.
        let (t2, removed) = t1.with_changes(vec![(1, Some(row(1, &[(1, 0, 3)])))]);
        assert_eq!(removed.len(), 1);
        let Some(Entry::Forward { domain, .. }) = t2.get(&key) else { panic!("entry") };
        assert!(Arc::ptr_eq(&domain.targets[0].state, &state_1));
        assert_eq!(domain.targets[0].state.active(), 1);

        // Domain 1 goes: its targets are reported, domain 2 takes the listener over.
        let (t3, removed) = t2.with_changes(vec![(1, None)]);
        assert_eq!(removed.len(), 1);
        assert!(Arc::ptr_eq(&removed[0], &state_1));
        let Some(Entry::Forward { domain, .. }) = t3.get(&key) else { panic!("entry") };
        assert_eq!(domain.row.id, 2);

        // A full reload compares by (domain, address) as well.
        let (_, removed) = Table::build(vec![row(2, &[])], &t3);
        assert_eq!(removed.len(), 1);
    }

    #[test]
    fn unchanged_rows_share_their_domain_and_the_static_address_is_never_a_target() {
        let mut r = row(1, &[(1, 0, 1)]);
        r.addresses.push(AddressRow { ip: r.static_ip, priority: 0, weight: 1, draining: false });
        let (t1, _) = Table::build(vec![r.clone()], &Table::empty());
        let (t2, _) = t1.with_changes(vec![(1, Some(r))]);
        assert!(Arc::ptr_eq(&t1.domains[&1], &t2.domains[&1]));
        assert_eq!(t2.domains[&1].targets.len(), 1);
    }

    #[test]
    fn closed_targets_are_avoided_at_once() {
        let (t, _) = Table::build(vec![row(1, &[(1, 0, 1), (2, 0, 1)])], &Table::empty());
        let domain = &t.domains[&1];
        domain.targets[0].state.close();
        for _ in 0..4 {
            assert_eq!(domain.choose(&[]).map(|t| t.ip), Some(ip(2)));
        }
        assert!(domain.choose(&[ip(2)]).is_none());
    }

    #[test]
    fn a_draining_target_takes_no_new_flows_but_keeps_its_running_ones() {
        let (t1, _) = Table::build(vec![row(1, &[(1, 0, 1), (2, 0, 1)])], &Table::empty());
        let flow = t1.domains[&1].targets[0].state.enter();
        let mut migrating = row(1, &[(1, 0, 1), (2, 0, 1)]);
        migrating.addresses[0].draining = true;
        let (t2, removed) = t1.with_changes(vec![(1, Some(migrating))]);
        assert!(removed.is_empty(), "the old address's flows are not closed");
        let domain = &t2.domains[&1];
        assert!(Arc::ptr_eq(&domain.targets[0].state, flow_state(&flow)));
        assert!(!domain.targets[0].state.is_closed());
        for _ in 0..4 {
            assert_eq!(domain.choose(&[]).map(|t| t.ip), Some(ip(2)));
        }
        assert!(domain.choose(&[ip(2)]).is_none(), "a draining target is never a retry either");
    }

    fn flow_state(guard: &ActiveGuard) -> &Arc<TargetState> {
        &guard.0
    }
}
