//! The kernel half of a host migration's redirect, shared by the packet-forwarder (a server's old address) and ncu (a
//! site's old uplink address): an nftables table of tether's own (`inet tether_migrate`), never touching anyone
//! else's rules. New flows (conntrack state `new`) to the old address and the migration's ports are
//! sent on to the new address (DNAT) with this host's address as their source (masquerade), so the new server's
//! replies come back the same way. Established connections are not new: they stay with the old server untouched.
//!
//! The table is replaced whole in one `nft -f -` run (one kernel transaction), so a change never opens a gap; each
//! rule carries a counter and the comment `migration <id>`, read back with `nft -j`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Stdio,
};

use serde::Deserialize;
use tokio::{io::AsyncWriteExt, process::Command};
use tracing::{info, warn};

/// The table's name, in family `inet`.
pub const TABLE: &str = "tether_migrate";

/// One migration's redirect.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Redirect {
    /// The migration's id.
    pub id: i64,
    /// The old address: held by this host.
    pub from: IpAddr,
    /// Where new flows go.
    pub to: IpAddr,
    /// Ports redirected, TCP and UDP.
    pub ports: Vec<u16>,
}

/// An `nft` run that failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// No `nft` binary.
    #[error("cannot run nft ({0}); install nftables")]
    Missing(std::io::Error),
    /// `nft` refused the script or the listing failed.
    #[error("nft failed: {0}")]
    Failed(String),
    /// `nft -j` printed something unexpected.
    #[error("unreadable nft -j output: {0}")]
    Output(String),
}

/// The script that replaces the table with one holding `redirects` (none: the table is removed). Every value in it
/// is an address or a number, so nothing in it comes from a person's text.
pub fn script(redirects: &[Redirect]) -> String {
    // `table` creates it when missing, so the delete never fails; all of it is one transaction.
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if redirects.is_empty() {
        return s;
    }
    let _ = writeln!(s, "table inet {TABLE} {{");
    s.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for r in redirects {
        let family = family(r.from);
        let ports = r.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        // A TCP connection the old server already has may be picked up by conntrack mid-stream (when nothing
        // tracked this host's flows before), and then looks new: only a SYN starts a flow worth redirecting.
        for (l4, only) in [("tcp", "tcp flags & (syn | ack) == syn "), ("udp", "")] {
            let _ = writeln!(
                s,
                "    {family} daddr {} {l4} dport {{ {ports} }} {only}ct state new counter dnat {family} to {} \
                 comment \"migration {}\"",
                r.from, r.to, r.id
            );
        }
    }
    s.push_str("  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    for r in redirects {
        let _ = writeln!(
            s,
            "    ct status dnat ct original {} daddr {} masquerade comment \"migration {}\"",
            family(r.from),
            r.from,
            r.id
        );
    }
    s.push_str("  }\n}\n");
    s
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// Replaces the table (see [`script`]).
pub async fn apply(redirects: &[Redirect]) -> Result<(), NftError> {
    run_script(&script(redirects)).await
}

/// The table of the site's port forwards, apart from the migrations' so neither rewrite touches the other.
pub const FORWARDS_TABLE: &str = "tether_services";

/// A service tuple forwarded by the site's router: flows to `from`:`port` over `protocol` go to `to` (the LAN
/// server the NCU's configuration maps the service to).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    /// The tuple's id.
    pub id: i64,
    /// The uplink's interface address.
    pub from: IpAddr,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The tuple's port.
    pub port: u16,
    /// The LAN server; of `from`'s family.
    pub to: SocketAddr,
}

/// The script that replaces the forwards table with one holding `forwards` (none: the table is removed).
pub fn forwards_script(forwards: &[Forward]) -> String {
    let mut s = format!("table inet {FORWARDS_TABLE}\ndelete table inet {FORWARDS_TABLE}\n");
    if forwards.is_empty() {
        return s;
    }
    let _ = writeln!(s, "table inet {FORWARDS_TABLE} {{");
    s.push_str("  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for f in forwards {
        let family = family(f.from);
        let _ = writeln!(
            s,
            "    {family} daddr {} {} dport {} counter dnat {family} to {} comment \"service {}\"",
            f.from, f.protocol, f.port, f.to, f.id
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// Replaces the forwards table (see [`forwards_script`]).
pub async fn apply_forwards(forwards: &[Forward]) -> Result<(), NftError> {
    run_script(&forwards_script(forwards)).await
}

/// Runs `nft -f -` with `script` as one transaction.
async fn run_script(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Missing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await.map_err(|e| NftError::Failed(e.to_string()))?;
    }
    let output = child.wait_with_output().await.map_err(|e| NftError::Failed(e.to_string()))?;
    if !output.status.success() {
        return Err(NftError::Failed(String::from_utf8_lossy(&output.stderr).trim().to_owned()));
    }
    Ok(())
}

/// New flows redirected so far, by migration id, from the rules' counters.
pub async fn counters() -> Result<BTreeMap<i64, u64>, NftError> {
    let output = Command::new("nft")
        .args(["-j", "list", "table", "inet", TABLE])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(NftError::Missing)?;
    if !output.status.success() {
        return Err(NftError::Failed(String::from_utf8_lossy(&output.stderr).trim().to_owned()));
    }
    parse_counters(&output.stdout)
}

#[derive(Deserialize)]
struct Listing {
    nftables: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Rule {
    chain: String,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    expr: Vec<serde_json::Value>,
}

/// Sums the packet counters of the prerouting rules by the id in their comment.
fn parse_counters(json: &[u8]) -> Result<BTreeMap<i64, u64>, NftError> {
    let listing: Listing = serde_json::from_slice(json).map_err(|e| NftError::Output(e.to_string()))?;
    let mut flows = BTreeMap::new();
    for item in listing.nftables {
        let Some(rule) = item.get("rule") else { continue };
        let rule: Rule = serde_json::from_value(rule.clone()).map_err(|e| NftError::Output(e.to_string()))?;
        let id = rule.comment.as_deref().and_then(|c| c.strip_prefix("migration ")).and_then(|id| id.parse().ok());
        let (Some(id), "prerouting") = (id, rule.chain.as_str()) else { continue };
        let packets: u64 = rule.expr.iter().filter_map(|e| e.get("counter")?.get("packets")?.as_u64()).sum();
        *flows.entry(id).or_insert(0) += packets;
    }
    Ok(flows)
}

/// What changed when the redirects were brought to the wanted set, or counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Now redirecting (newly, or again after a failure).
    Held(i64),
    /// No longer redirecting.
    Released(i64),
    /// Cannot redirect, and why (reported once per reason).
    Failed(i64, String),
    /// New flows redirected so far (reported when the count grew).
    Flows(i64, u64),
}

/// The redirects this host holds, kept equal to a wanted set.
#[derive(Debug)]
pub struct Kernel {
    host: String,
    installed: Vec<Redirect>,
    flows: BTreeMap<i64, u64>,
    failed: BTreeMap<i64, String>,
    apply_error: Option<String>,
}

impl Kernel {
    /// Nothing held yet; `host` names this host in error reports.
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            installed: Vec::new(),
            flows: BTreeMap::new(),
            failed: BTreeMap::new(),
            apply_error: None,
        }
    }

    /// Redirects held.
    pub fn held(&self) -> usize {
        self.installed.len()
    }

    /// Makes the kernel hold exactly those of `wanted` whose address family this host forwards; the others fail
    /// with the sysctl to turn on. A failed `nft` run is retried at the next call.
    pub async fn reconcile(&mut self, mut wanted: Vec<Redirect>) -> Vec<Report> {
        wanted.sort();
        let mut reports = Vec::new();
        let (ok, blocked): (Vec<Redirect>, Vec<Redirect>) = wanted.into_iter().partition(|r| forwarding_on(r.from));
        for r in &blocked {
            let why = format!(
                "IP forwarding is off on {} ({} = 0): redirected flows could not leave",
                self.host,
                sysctl(r.from)
            );
            self.fail(r.id, why, &mut reports);
        }
        self.failed.retain(|id, _| blocked.iter().any(|r| r.id == *id) || ok.iter().any(|r| r.id == *id));
        if ok == self.installed && self.apply_error.is_none() {
            return reports;
        }
        match apply(&ok).await {
            Ok(()) => {
                let before: BTreeSet<i64> = self.installed.iter().map(|r| r.id).collect();
                for r in &ok {
                    if !before.contains(&r.id) || self.failed.remove(&r.id).is_some() {
                        info!(migration = r.id, from = %r.from, to = %r.to, ports = ?r.ports, "redirecting new flows");
                        reports.push(Report::Held(r.id));
                    }
                }
                for id in before.iter().filter(|id| !ok.iter().any(|r| r.id == **id)) {
                    info!(migration = id, "redirect released");
                    self.flows.remove(id);
                    reports.push(Report::Released(*id));
                }
                self.installed = ok;
                self.apply_error = None;
            }
            Err(error) => {
                let why = error.to_string();
                if self.apply_error.as_ref() != Some(&why) {
                    warn!(%error, redirects = ok.len(), "cannot install the redirects; retrying");
                }
                for r in &ok {
                    self.fail(r.id, why.clone(), &mut reports);
                }
                self.apply_error = Some(why);
            }
        }
        reports
    }

    fn fail(&mut self, id: i64, why: String, reports: &mut Vec<Report>) {
        if self.failed.get(&id) != Some(&why) {
            warn!(migration = id, error = %why, "cannot redirect");
            self.failed.insert(id, why.clone());
            reports.push(Report::Failed(id, why));
        }
    }

    /// The counts that grew since the last call (or since [`Kernel::forget`]).
    pub async fn count(&mut self) -> Vec<Report> {
        if self.installed.is_empty() {
            return Vec::new();
        }
        let counters = match counters().await {
            Ok(counters) => counters,
            Err(error) => {
                tracing::debug!(%error, "cannot read the redirect counters");
                return Vec::new();
            }
        };
        let mut reports = Vec::new();
        for (id, flows) in counters {
            if flows > self.flows.get(&id).copied().unwrap_or(0) {
                self.flows.insert(id, flows);
                reports.push(Report::Flows(id, flows));
            }
        }
        reports
    }

    /// Reports migration `id`'s count again at the next [`Kernel::count`] (its last report was lost).
    pub fn forget(&mut self, id: i64) {
        self.flows.remove(&id);
    }

    /// Removes the table when anything is held (at shutdown: no redirect outlives its manager).
    pub async fn clear(&mut self) {
        if self.installed.is_empty() {
            return;
        }
        match apply(&[]).await {
            Ok(()) => info!(redirects = self.installed.len(), "redirects removed"),
            Err(error) => warn!(%error, "could not remove the redirects"),
        }
        self.installed.clear();
    }
}

/// True when `ip` is assigned to this host (in this network namespace): a socket can be bound to it.
pub fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The sysctl that lets this host forward `ip`'s family.
pub fn sysctl(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "net.ipv4.ip_forward" } else { "net.ipv6.conf.all.forwarding" }
}

/// True when that sysctl is on.
pub fn forwarding_on(ip: IpAddr) -> bool {
    let path = format!("/proc/sys/{}", sysctl(ip).replace('.', "/"));
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_replaces_the_table_and_counts_new_flows_only() {
        let empty = script(&[]);
        assert_eq!(empty, "table inet tether_migrate\ndelete table inet tether_migrate\n");
        let r = Redirect {
            id: 7,
            from: "198.18.1.2".parse().expect("ip"),
            to: "198.18.2.2".parse().expect("ip"),
            ports: vec![80, 443],
        };
        let v6 = Redirect {
            id: 8,
            from: "fd00::1".parse().expect("ip"),
            to: "fd00::2".parse().expect("ip"),
            ports: vec![53],
        };
        let s = script(&[r, v6]);
        assert!(s.starts_with(&empty), "{s}");
        assert!(s.contains(
            "ip daddr 198.18.1.2 tcp dport { 80, 443 } tcp flags & (syn | ack) == syn ct state new counter dnat ip to \
             198.18.2.2 comment \"migration 7\""
        ));
        assert!(s.contains("ip daddr 198.18.1.2 udp dport { 80, 443 } ct state new counter dnat ip to 198.18.2.2"));
        assert!(s.contains("ip6 daddr fd00::1 udp dport { 53 } ct state new counter dnat ip6 to fd00::2"));
        assert!(s.contains("ct status dnat ct original ip daddr 198.18.1.2 masquerade comment \"migration 7\""));
        assert!(s.contains("ct status dnat ct original ip6 daddr fd00::1 masquerade"));
    }

    #[test]
    fn forwards_are_one_dnat_rule_each_in_their_own_table() {
        assert_eq!(forwards_script(&[]), "table inet tether_services\ndelete table inet tether_services\n");
        let f = Forward {
            id: 3,
            from: "198.18.1.2".parse().expect("ip"),
            protocol: "tcp",
            port: 443,
            to: "198.19.1.10:8443".parse().expect("addr"),
        };
        let v6 = Forward {
            id: 4,
            from: "fd00::1".parse().expect("ip"),
            protocol: "udp",
            port: 53,
            to: "[fd00:1::10]:53".parse().expect("addr"),
        };
        let s = forwards_script(&[f, v6]);
        assert!(
            s.contains("ip daddr 198.18.1.2 tcp dport 443 counter dnat ip to 198.19.1.10:8443 comment \"service 3\""),
            "{s}"
        );
        assert!(
            s.contains("ip6 daddr fd00::1 udp dport 53 counter dnat ip6 to [fd00:1::10]:53 comment \"service 4\""),
            "{s}"
        );
        assert!(!s.contains("tether_migrate"));
    }

    #[test]
    fn counters_are_summed_per_migration_from_prerouting_rules() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "tether_migrate", "handle": 1}},
          {"rule": {"family": "inet", "table": "tether_migrate", "chain": "prerouting", "handle": 4,
            "comment": "migration 7", "expr": [{"match": {}}, {"counter": {"packets": 3, "bytes": 180}}, {"dnat": {}}]}},
          {"rule": {"family": "inet", "table": "tether_migrate", "chain": "prerouting", "handle": 5,
            "comment": "migration 7", "expr": [{"counter": {"packets": 2, "bytes": 100}}]}},
          {"rule": {"family": "inet", "table": "tether_migrate", "chain": "postrouting", "handle": 6,
            "comment": "migration 7", "expr": [{"counter": {"packets": 99, "bytes": 1}}]}},
          {"rule": {"family": "inet", "table": "tether_migrate", "chain": "prerouting", "handle": 7,
            "comment": "someone else", "expr": [{"counter": {"packets": 50, "bytes": 1}}]}}]}"#;
        let flows = parse_counters(json).expect("parses");
        assert_eq!(flows.into_iter().collect::<Vec<_>>(), [(7, 5)]);
        assert!(parse_counters(b"not json").is_err());
    }
}
