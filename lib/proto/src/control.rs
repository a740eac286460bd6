//! The NCU ↔ HBS control protocol (QUIC, ALPN `tether-hbs/1`, mutual TLS): one long-lived bidirectional stream per
//! connection carrying length-prefixed JSON frames (see [`crate::frame`]). The NCU registers its uplinks; the HBS
//! answers with the session's heartbeat key and port, and may later ask the NCU to move (`Drain`) or to redirect new
//! flows reaching one of its uplink addresses to another address while a host migration moves the site
//! (`Redirect`); the NCU reports what it redirected (`Redirected`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// ALPN of the protocol.
pub const ALPN: &[u8] = b"tether-hbs/1";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024;
/// Most uplinks one NCU may register (the core design's 15 routes).
pub const MAX_UPLINKS: usize = 15;

/// From the NCU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToHbs {
    /// The complete set of uplinks to monitor; replaces any earlier set. Answered with `Registered`.
    Register {
        /// At most [`MAX_UPLINKS`].
        uplinks: Vec<Uplink>,
        /// The session's generation: the NCU raises it with every new session, so the newest session owns its
        /// addresses and a late registration of an older one (at another server) changes nothing. 0 (older NCUs,
        /// tools) is unordered: written whatever the stored generation.
        #[serde(default)]
        generation: u64,
    },
    /// One uplink (re)appeared. Answered with `Registered`.
    UplinkUp {
        /// The uplink.
        uplink: Uplink,
    },
    /// One uplink went away: its address is withdrawn at once. Answered with `Registered`.
    UplinkDown {
        /// Its name.
        name: String,
    },
    /// A service tuple the HBS sent passed or failed its check at the site. Sent when it changes; not answered.
    ServiceHealth {
        /// The tuple.
        id: i64,
        /// Passed.
        healthy: bool,
        /// Why it failed (at most [`MAX_REASON`] bytes).
        reason: Option<String>,
    },
    /// What became of a redirect the HBS asked for: held (no error) and the new flows sent on so far, or why it
    /// cannot be held. Not answered.
    Redirected {
        /// The migration.
        id: i64,
        /// New flows redirected so far.
        flows: u64,
        /// Why the redirect cannot be held (at most [`MAX_REASON`] bytes).
        error: Option<String>,
    },
}

/// Longest reason an NCU may give.
pub const MAX_REASON: usize = 512;

/// A service tuple bound to one of the NCU's uplink addresses: the site forwards it (or, on a server, runs it) and
/// checks it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteService {
    /// The tuple's id.
    pub id: i64,
    /// Service name without the underscore, e.g. `https`.
    pub service: String,
    /// `tcp`, `udp`, `tls` or `sctp`.
    pub transport: String,
    /// The uplink whose address the tuple names.
    pub uplink: String,
    /// That uplink's interface address, where the flows arrive.
    pub address: IpAddr,
    /// The port clients connect to.
    pub port: u16,
}

/// Most service tuples one NCU is sent.
pub const MAX_SERVICES: usize = 256;

/// A redirect of new flows reaching an uplink address, while a host migration moves the site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// The migration.
    pub id: i64,
    /// The uplink whose address is migrated away from.
    pub uplink: String,
    /// That uplink's interface address, where the flows arrive.
    pub from: IpAddr,
    /// Where new flows go.
    pub to: IpAddr,
    /// Ports redirected, TCP and UDP (1 to 64 of them).
    pub ports: Vec<u16>,
}

/// One uplink of the NCU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Interface name, e.g. `wan1`; unique per NCU.
    pub name: String,
    /// Index carried in heartbeat packets (below [`MAX_UPLINKS`]), stable for the life of the uplink.
    pub index: u8,
    /// The interface address; the published address is the one heartbeat replies come from.
    pub address: IpAddr,
    /// UDP port the NCU answers heartbeats on for this uplink.
    pub port: u16,
    /// Lower is preferred (backup links get higher values).
    #[serde(default)]
    pub priority: u16,
    /// Share among equals.
    #[serde(default = "one")]
    pub weight: u16,
}

/// From the HBS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToNcu {
    /// The session's heartbeat parameters and what became of each uplink.
    Registered {
        /// Session id carried in heartbeat packets.
        session: u64,
        /// The session's heartbeat key, hex.
        key: String,
        /// UDP port of the HBS's heartbeat socket (hellos go there).
        heartbeat_port: u16,
        /// Ping interval, milliseconds.
        interval_ms: u64,
        /// Uplinks accepted for monitoring.
        accepted: Vec<String>,
        /// Uplinks refused, with the reason.
        refused: Vec<Refusal>,
    },
    /// The complete set of redirects this NCU should hold now (at most [`MAX_UPLINKS`]); replaces any earlier set.
    /// Sent only after `Registered`, and again whenever it changes.
    Redirect {
        /// The redirects.
        redirects: Vec<Redirect>,
    },
    /// The complete set of service tuples bound to this NCU's addresses (at most [`MAX_SERVICES`]); replaces any
    /// earlier set. Sent only after `Registered`, and again whenever it changes.
    Services {
        /// The tuples.
        services: Vec<SiteService>,
    },
    /// A newer session of this NCU (at `generation`, perhaps at another server) holds its addresses: nothing was
    /// written. An NCU whose session this is (it is the newest it knows of) registers again above `generation`.
    Superseded {
        /// The stored generation.
        generation: u64,
    },
    /// Ask hds for another heartbeat server and move there.
    Drain {
        /// Why, for the logs.
        reason: String,
    },
    /// The last request was refused; the connection stays usable unless the error says otherwise.
    Error {
        /// Stable reason.
        code: ControlError,
        /// For a person.
        message: String,
    },
}

/// An uplink the HBS would not monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// The uplink.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// Why a control request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlError {
    /// The frame could not be parsed, or the version is unknown.
    Malformed,
    /// More than [`MAX_UPLINKS`], duplicate names or indexes, or an unusable address.
    Invalid,
    /// The client certificate belongs to no enrolled NCU.
    UnknownCertificate,
    /// The server is draining or full and takes no new sessions.
    Unavailable,
}

fn one() -> u16 {
    1
}

/// Checks an uplink set: size, unique names and indexes, indexes below [`MAX_UPLINKS`], usable addresses.
pub fn validate(uplinks: &[Uplink]) -> Result<(), String> {
    if uplinks.len() > MAX_UPLINKS {
        return Err(format!("{} uplinks; at most {MAX_UPLINKS}", uplinks.len()));
    }
    for (i, uplink) in uplinks.iter().enumerate() {
        validate_one(uplink)?;
        if uplinks[..i].iter().any(|u| u.name == uplink.name || u.index == uplink.index) {
            return Err(format!("uplink {:?}: duplicate name or index", uplink.name));
        }
    }
    Ok(())
}

/// Checks a redirect set from the HBS: its size, ports, address families.
pub fn validate_redirects(redirects: &[Redirect]) -> Result<(), String> {
    if redirects.len() > MAX_UPLINKS {
        return Err(format!("{} redirects; at most {MAX_UPLINKS}", redirects.len()));
    }
    for r in redirects {
        if r.ports.is_empty() || r.ports.len() > 64 || r.ports.contains(&0) {
            return Err(format!("redirect {}: 1 to 64 ports of 1-65535", r.id));
        }
        if r.from.is_ipv4() != r.to.is_ipv4() || r.from == r.to {
            return Err(format!("redirect {}: {} to {} is not one family, or goes nowhere", r.id, r.from, r.to));
        }
    }
    Ok(())
}

/// Checks a service set from the HBS: its size, names, ports.
pub fn validate_services(services: &[SiteService]) -> Result<(), String> {
    if services.len() > MAX_SERVICES {
        return Err(format!("{} services; at most {MAX_SERVICES}", services.len()));
    }
    for s in services {
        let label =
            |l: &str| !l.is_empty() && l.len() <= 62 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !label(&s.service) || !["tcp", "udp", "tls", "sctp"].contains(&s.transport.as_str()) || s.port == 0 {
            return Err(format!("service {}: bad name, transport or port", s.id));
        }
    }
    Ok(())
}

/// Checks one uplink.
pub fn validate_one(uplink: &Uplink) -> Result<(), String> {
    if uplink.name.is_empty() || uplink.name.len() > 32 || !uplink.name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!("uplink name {:?}: 1-32 printable characters", uplink.name));
    }
    if usize::from(uplink.index) >= MAX_UPLINKS {
        return Err(format!("uplink {:?}: index {} is not below {MAX_UPLINKS}", uplink.name, uplink.index));
    }
    let ip = uplink.address;
    if ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        return Err(format!("uplink {:?}: {ip} cannot be a host address", uplink.name));
    }
    if uplink.port == 0 || uplink.weight == 0 {
        return Err(format!("uplink {:?}: port and weight must be above zero", uplink.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(name: &str, index: u8, ip: &str) -> Uplink {
        Uplink { name: name.into(), index, address: ip.parse().expect("ip"), port: 5000, priority: 0, weight: 1 }
    }

    #[test]
    fn sets_are_validated() {
        assert!(validate(&[uplink("wan1", 0, "198.18.0.1"), uplink("wan2", 1, "fd00::1")]).is_ok());
        let sixteen: Vec<Uplink> = (0..16).map(|i| uplink(&format!("u{i}"), i, "198.18.0.1")).collect();
        assert!(validate(&sixteen).unwrap_err().contains("at most 15"));
        assert!(validate(&[uplink("a", 0, "198.18.0.1"), uplink("a", 1, "198.18.0.2")]).is_err());
        assert!(validate(&[uplink("a", 0, "198.18.0.1"), uplink("b", 0, "198.18.0.2")]).is_err());
        assert!(validate(&[uplink("a", 16, "198.18.0.1")]).is_err());
        assert!(validate(&[uplink("a", 0, "0.0.0.0")]).is_err());
    }

    #[test]
    fn redirect_sets_are_validated() {
        let r = |id: i64, from: &str, to: &str, ports: Vec<u16>| Redirect {
            id,
            uplink: "wan1".into(),
            from: from.parse().expect("ip"),
            to: to.parse().expect("ip"),
            ports,
        };
        assert!(validate_redirects(&[r(1, "198.18.1.2", "198.18.2.2", vec![80])]).is_ok());
        assert!(validate_redirects(&[r(1, "198.18.1.2", "fd00::2", vec![80])]).is_err());
        assert!(validate_redirects(&[r(1, "198.18.1.2", "198.18.1.2", vec![80])]).is_err());
        assert!(validate_redirects(&[r(1, "198.18.1.2", "198.18.2.2", vec![0])]).is_err());
        assert!(validate_redirects(&[r(1, "198.18.1.2", "198.18.2.2", vec![])]).is_err());
        let many: Vec<Redirect> = (0..16).map(|i| r(i, "198.18.1.2", "198.18.2.2", vec![80])).collect();
        assert!(validate_redirects(&many).is_err());
    }

    #[test]
    fn a_register_without_a_generation_is_unordered() {
        let body = br#"{"version":1,"body":{"type":"register","uplinks":[]}}"#;
        let mut bytes = u32::try_from(body.len()).expect("short").to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        let decoded = crate::frame::decode::<ToHbs>(VERSION, MAX_FRAME, &bytes);
        assert_eq!(decoded, Ok(ToHbs::Register { uplinks: vec![], generation: 0 }));
    }

    #[test]
    fn frames_round_trip() {
        let message = ToHbs::Register { uplinks: vec![uplink("wan1", 0, "198.18.0.1")], generation: 7 };
        let bytes = crate::frame::encode(VERSION, &message);
        assert_eq!(crate::frame::decode::<ToHbs>(VERSION, MAX_FRAME, &bytes), Ok(message));
    }
}
