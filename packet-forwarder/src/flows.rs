//! The UDP flow table as a sans-IO machine: flows by client address, idle expiry in explicit time.
//!
//! The shell ([`crate::udp`]) feeds datagrams (`get`, `insert`), asks `poll_timeout()` for its one timer, and calls
//! `handle_timeout(now, last_reply)`; replies are counted outside the machine, so their time comes in through
//! `last_reply`. Expiry is lazy: a deadline is queued once per idle period, not per datagram.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

/// Flows keyed by client address, each holding the shell's value `T`.
#[derive(Debug)]
pub struct FlowTable<T> {
    idle: Duration,
    flows: HashMap<SocketAddr, Flow<T>>,
    /// (deadline, client): a flow's queued check; later activity makes it re-queue instead of expiring.
    deadlines: BTreeSet<(Instant, SocketAddr)>,
}

#[derive(Debug)]
struct Flow<T> {
    last: Instant,
    value: T,
}

impl<T> FlowTable<T> {
    /// An empty table closing flows idle for `idle`.
    pub fn new(idle: Duration) -> Self {
        Self { idle, flows: HashMap::new(), deadlines: BTreeSet::new() }
    }

    /// The flow of `client`, marked active at `now`.
    pub fn get(&mut self, client: SocketAddr, now: Instant) -> Option<&T> {
        let flow = self.flows.get_mut(&client)?;
        flow.last = flow.last.max(now);
        Some(&flow.value)
    }

    /// Starts a flow for `client`; returns the value of a flow it replaces.
    pub fn insert(&mut self, client: SocketAddr, value: T, now: Instant) -> Option<T> {
        let old = self.flows.insert(client, Flow { last: now, value });
        self.deadlines.insert((now + self.idle, client));
        old.map(|f| f.value)
    }

    /// Ends the flow of `client` now.
    pub fn remove(&mut self, client: SocketAddr) -> Option<T> {
        // Its queued deadline stays and is skipped when it comes.
        self.flows.remove(&client).map(|f| f.value)
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Ends the flows idle for the whole timeout at `now`; `last_reply` gives the time of a flow's last reply.
    pub fn handle_timeout(&mut self, now: Instant, last_reply: impl Fn(&T) -> Option<Instant>) -> Vec<(SocketAddr, T)> {
        let mut expired = Vec::new();
        while let Some(&(at, client)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(flow) = self.flows.get_mut(&client) else { continue };
            if let Some(reply) = last_reply(&flow.value) {
                flow.last = flow.last.max(reply);
            }
            let due = flow.last + self.idle;
            if due <= now {
                if let Some(flow) = self.flows.remove(&client) {
                    expired.push((client, flow.value));
                }
            } else {
                self.deadlines.insert((due, client));
            }
        }
        expired
    }

    /// Flows running.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow runs.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Ends every flow whose value matches, e.g. those to an address that died.
    pub fn remove_where(&mut self, mut matches: impl FnMut(&T) -> bool) -> Vec<(SocketAddr, T)> {
        let clients: Vec<SocketAddr> = self.flows.iter().filter(|(_, f)| matches(&f.value)).map(|(c, _)| *c).collect();
        clients.into_iter().filter_map(|c| self.flows.remove(&c).map(|f| (c, f.value))).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const IDLE: Duration = Duration::from_secs(10);

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn idle_flows_expire_at_their_deadline_and_not_before() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(IDLE);
        assert_eq!(table.poll_timeout(), None);
        table.insert(client(1), "a", t0);
        table.insert(client(2), "b", t0 + Duration::from_secs(3));
        assert_eq!(table.poll_timeout(), Some(t0 + IDLE));
        assert!(table.handle_timeout(t0 + IDLE - Duration::from_millis(1), |_| None).is_empty());
        let expired = table.handle_timeout(t0 + IDLE, |_| None);
        assert_eq!(expired, [(client(1), "a")]);
        assert_eq!(table.poll_timeout(), Some(t0 + Duration::from_secs(13)));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn datagrams_either_way_keep_a_flow_alive() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(IDLE);
        table.insert(client(1), (), t0);
        // A client datagram at 6 s: the check at 10 s re-queues for 16 s.
        assert!(table.get(client(1), t0 + Duration::from_secs(6)).is_some());
        assert!(table.handle_timeout(t0 + IDLE, |_| None).is_empty());
        assert_eq!(table.poll_timeout(), Some(t0 + Duration::from_secs(16)));
        // A reply at 15 s: the check at 16 s re-queues for 25 s.
        let reply = Cell::new(Some(t0 + Duration::from_secs(15)));
        assert!(table.handle_timeout(t0 + Duration::from_secs(16), |_| reply.get()).is_empty());
        assert_eq!(table.poll_timeout(), Some(t0 + Duration::from_secs(25)));
        reply.set(None);
        assert_eq!(table.handle_timeout(t0 + Duration::from_secs(25), |_| reply.get()).len(), 1);
        assert!(table.is_empty());
        assert_eq!(table.poll_timeout(), None);
    }

    #[test]
    fn removed_flows_leave_only_a_stale_deadline() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(IDLE);
        table.insert(client(1), 1, t0);
        table.insert(client(2), 2, t0);
        assert_eq!(table.remove(client(1)), Some(1));
        assert_eq!(table.remove_where(|v| *v == 2), [(client(2), 2)]);
        assert!(table.handle_timeout(t0 + IDLE, |_| None).is_empty());
        assert_eq!(table.poll_timeout(), None);
        // A new flow for an old client gets a fresh deadline.
        table.insert(client(1), 3, t0 + IDLE);
        assert!(table.get(client(1), t0 + IDLE).is_some());
        assert_eq!(table.poll_timeout(), Some(t0 + IDLE + IDLE));
    }
}
