//! Request bodies and the validation of names, addresses and numbers in them.

use std::net::IpAddr;

use serde::Deserialize;

use super::ApiError;
use crate::{store::admin, view::Nameserver};

/// `POST /v1/domains/{name}/migrations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewMigration {
    pub(super) from: IpAddr,
    pub(super) to: IpAddr,
    pub(super) temporary: Option<IpAddr>,
    /// Seconds; default: the configured factor times the longest TTL the name was served with.
    pub(super) hold: Option<u32>,
    /// Seconds without a redirected flow; default: the configured quiet time.
    pub(super) quiet: Option<u32>,
    /// Default: the domain's forwarded ports, else its service tuples' ports.
    pub(super) ports: Option<Vec<u16>>,
}

/// `POST /v1/subscribers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewSubscriber {
    pub(super) name: String,
}

/// `POST /v1/zones`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewZone {
    pub(super) origin: String,
    pub(super) nameservers: Vec<NameserverSpec>,
    pub(super) hostmaster: Option<String>,
    #[serde(default = "default_refresh")]
    pub(super) refresh: u32,
    #[serde(default = "default_retry")]
    pub(super) retry: u32,
    #[serde(default = "default_expire")]
    pub(super) expire: u32,
    #[serde(default = "default_minimum")]
    pub(super) minimum: u32,
    #[serde(default = "default_soa_ttl")]
    pub(super) soa_ttl: u32,
    #[serde(default = "default_ns_ttl")]
    pub(super) ns_ttl: u32,
}

/// A nameserver: a bare name, or a name with glue addresses.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum NameserverSpec {
    Name(String),
    WithGlue(Nameserver),
}

/// `POST /v1/domains`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewDomain {
    pub(super) name: String,
    pub(super) static_ip: Option<IpAddr>,
    #[serde(default = "default_ttl")]
    pub(super) ttl: u32,
    pub(super) fallback_ip: Option<IpAddr>,
    #[serde(default)]
    pub(super) when_empty: WhenEmpty,
    #[serde(default = "default_load_threshold")]
    pub(super) load_threshold_pct: u32,
    /// Required when the operator creates a domain; refused from a subscriber.
    pub(super) subscriber_id: Option<i64>,
}

/// What a name answers when nothing is live and there is no fallback.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum WhenEmpty {
    #[default]
    Nodata,
    LastKnown,
}

/// `POST /v1/domains/{name}/addresses`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewAddress {
    pub(super) ip: IpAddr,
    #[serde(default)]
    pub(super) priority: u16,
    #[serde(default = "default_weight")]
    pub(super) weight: u16,
    pub(super) check: Option<Check>,
}

/// A service check a heartbeat server runs against a static address.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum Check {
    /// Connect, optionally send a line and expect a reply starting with `expect`.
    Tcp {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
    /// GET `path`, expect `status`.
    Http {
        port: u16,
        #[serde(default = "default_path")]
        path: String,
        #[serde(default = "default_status")]
        status: u16,
    },
}

/// Longest path, `send` or `expect` of a check.
const MAX_CHECK_TEXT: usize = 256;

impl Check {
    /// Refuses port 0, an HTTP status that is none, and what would make a check a tool against others: an HTTP path
    /// that is not a path (`@127.0.0.1/` would name another host), bytes chosen by the subscriber sent into private
    /// or reserved space (even a range the operator opened), texts past [`MAX_CHECK_TEXT`].
    pub(super) fn validate(&self, ip: IpAddr) -> Result<(), ApiError> {
        let text = |field: &str, value: &str| {
            if value.len() > MAX_CHECK_TEXT || value.chars().any(|c| c.is_control() && c != '\r' && c != '\n') {
                return Err(ApiError::invalid(format!(
                    "check.{field}: at most {MAX_CHECK_TEXT} bytes, no control characters"
                )));
            }
            Ok(())
        };
        let (Self::Tcp { port, .. } | Self::Http { port, .. }) = self;
        if *port == 0 {
            return Err(ApiError::invalid("check.port: 1-65535"));
        }
        match self {
            Self::Http { path, status, .. } => {
                if !(100..=599).contains(status) {
                    return Err(ApiError::invalid(format!("check.status: {status} is not an HTTP status (100-599)")));
                }
                let path_ok =
                    path.starts_with('/') && path.len() <= MAX_CHECK_TEXT && path.bytes().all(|b| b.is_ascii_graphic());
                if !path_ok {
                    return Err(ApiError::invalid(format!(
                        "check.path: {path:?} must be a path: starting with /, printable, at most {MAX_CHECK_TEXT} bytes"
                    )));
                }
            }
            Self::Tcp { send, expect, .. } => {
                if let Some(send) = send {
                    text("send", send)?;
                    if let Err(why) = tether_config::TargetPolicy::default().check(ip) {
                        return Err(ApiError::invalid(format!("check.send: no bytes of yours are sent there: {why}")));
                    }
                }
                if let Some(expect) = expect {
                    text("expect", expect)?;
                }
            }
        }
        Ok(())
    }
}

/// Most addresses of one domain with a service check: the checks' rate per domain is bounded by it.
pub(super) const MAX_CHECKS: i64 = 16;

/// One element of `PUT /v1/domains/{name}/services`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSpec {
    pub(super) service: String,
    pub(super) transport: String,
    pub(super) ip: Option<IpAddr>,
    pub(super) target: Option<String>,
    pub(super) port: u16,
    #[serde(default)]
    pub(super) priority: u16,
    #[serde(default)]
    pub(super) weight: u16,
}

/// Most service tuples one domain may have.
pub(super) const MAX_SERVICES: usize = 64;

/// `PUT /v1/domains/{name}/forwarding`: the packet-forwarder settings; a field left out keeps its value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Forwarding {
    pub(super) ports: Option<Vec<u16>>,
    pub(super) policy: Option<ForwardPolicy>,
    pub(super) proxy_protocol: Option<ProxyProtocol>,
    pub(super) max_flows: Option<u32>,
    pub(super) max_flows_per_client: Option<u32>,
}

/// How the forwarder spreads new flows over the live addresses.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ForwardPolicy {
    RoundRobin,
    LeastConnections,
}

/// Whether the site's server gets a PROXY protocol v2 header.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ProxyProtocol {
    Off,
    Tcp,
    TcpUdp,
}

/// Most forwarded ports one domain may list.
pub(super) const MAX_FORWARD_PORTS: usize = 64;
/// Highest flow cap.
pub(super) const MAX_FLOWS: u32 = 1_000_000;

/// The settings after `update`, checked as a whole.
pub(super) fn forwarding(current: admin::Forwarding, update: Forwarding) -> Result<admin::Forwarding, ApiError> {
    let mut next = current;
    if let Some(mut ports) = update.ports {
        if ports.len() > MAX_FORWARD_PORTS {
            return Err(ApiError::invalid(format!("ports: at most {MAX_FORWARD_PORTS}")));
        }
        if ports.contains(&0) {
            return Err(ApiError::invalid("ports: 0 is not a port"));
        }
        ports.sort_unstable();
        if let Some(pair) = ports.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(ApiError::invalid(format!("ports: {} is listed twice", pair[0])));
        }
        next.ports = ports.into_iter().map(i32::from).collect();
    }
    if let Some(policy) = update.policy {
        next.policy = match policy {
            ForwardPolicy::RoundRobin => "round_robin",
            ForwardPolicy::LeastConnections => "least_connections",
        }
        .into();
    }
    if let Some(proxy) = update.proxy_protocol {
        next.proxy_protocol = match proxy {
            ProxyProtocol::Off => "off",
            ProxyProtocol::Tcp => "tcp",
            ProxyProtocol::TcpUdp => "tcp_udp",
        }
        .into();
    }
    if let Some(max) = update.max_flows {
        next.max_flows = bounded("max_flows", max, 1, MAX_FLOWS)?;
        if update.max_flows_per_client.is_none() {
            // Lowering the domain cap alone lowers the per-client cap with it.
            next.max_flows_per_client = next.max_flows_per_client.min(next.max_flows);
        }
    }
    if let Some(max) = update.max_flows_per_client {
        next.max_flows_per_client = bounded("max_flows_per_client", max, 1, MAX_FLOWS)?;
    }
    if next.max_flows_per_client > next.max_flows {
        return Err(ApiError::invalid(format!(
            "max_flows_per_client: {} is above max_flows ({})",
            next.max_flows_per_client, next.max_flows
        )));
    }
    Ok(next)
}

/// Turns user input into the stored form: lower case, fully qualified (`www.example.com.`), or says what is wrong.
pub(super) fn hostname(field: &str, input: &str) -> Result<String, ApiError> {
    domain_name(field, input, false)
}

/// Like [`hostname`], for the owner of a record that is not a host: a label may also start with an underscore
/// (`_acme-challenge.www.example.com`, `_dmarc.example.com`).
pub(super) fn record_owner(field: &str, input: &str) -> Result<String, ApiError> {
    domain_name(field, input, true)
}

fn domain_name(field: &str, input: &str, underscore: bool) -> Result<String, ApiError> {
    let name = input.strip_suffix('.').unwrap_or(input).to_ascii_lowercase();
    if name.is_empty() {
        return Err(ApiError::invalid(format!("{field}: empty name")));
    }
    if name.len() > 253 {
        return Err(ApiError::invalid(format!("{field}: longer than 253 characters")));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(ApiError::invalid(format!("{field}: empty label in {input:?}")));
        }
        // The underscore counts: a DNS label holds at most 63 bytes, whatever they are.
        if label.len() > 63 {
            return Err(ApiError::invalid(format!("{field}: label {label:?} is longer than 63 characters")));
        }
        let label = if underscore { label.strip_prefix('_').unwrap_or(label) } else { label };
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(ApiError::invalid(format!(
                "{field}: label {label:?} may hold only letters, digits and hyphens"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(ApiError::invalid(format!("{field}: label {label:?} may not start or end with a hyphen")));
        }
    }
    if !name.contains('.') {
        return Err(ApiError::invalid(format!("{field}: {input:?} is not a domain name (no dot)")));
    }
    Ok(format!("{name}."))
}

/// A service or transport label: `http`, `tcp`; a leading underscore is accepted and dropped.
pub(super) fn service_label(field: &str, input: &str) -> Result<String, ApiError> {
    let label = input.strip_prefix('_').unwrap_or(input).to_ascii_lowercase();
    let ok = !label.is_empty()
        && label.len() <= 62
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    if ok {
        Ok(label)
    } else {
        Err(ApiError::invalid(format!("{field}: {input:?} must be 1-62 letters, digits or inner hyphens")))
    }
}

/// Refuses addresses no one can reach: unspecified, multicast, broadcast.
pub(super) fn usable_ip(field: &str, ip: IpAddr) -> Result<IpAddr, ApiError> {
    let bad = ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bad { Err(ApiError::invalid(format!("{field}: {ip} cannot be used as a host address"))) } else { Ok(ip) }
}

/// Refuses what [`usable_ip`] refuses and what the operator's target policy refuses (private and reserved space,
/// the operator's own addresses): no subscriber's traffic is sent there.
pub(super) fn target_ip(field: &str, ip: IpAddr, policy: &tether_config::TargetPolicy) -> Result<IpAddr, ApiError> {
    let ip = usable_ip(field, ip.to_canonical())?;
    policy.check(ip).map_err(|why| ApiError::invalid(format!("{field}: {why}")))?;
    Ok(ip)
}

/// A number within bounds, or an error naming the field.
pub(super) fn bounded(field: &str, value: u32, min: u32, max: u32) -> Result<i32, ApiError> {
    if (min..=max).contains(&value) {
        Ok(i32::try_from(value).unwrap_or(i32::MAX))
    } else {
        Err(ApiError::invalid(format!("{field}: {value} is outside {min}..={max}")))
    }
}

/// How a name is shown: without the trailing dot.
pub(super) fn display(fqdn: &str) -> &str {
    fqdn.strip_suffix('.').unwrap_or(fqdn)
}

fn default_refresh() -> u32 {
    3600
}
fn default_retry() -> u32 {
    600
}
fn default_expire() -> u32 {
    604_800
}
fn default_minimum() -> u32 {
    1
}
fn default_soa_ttl() -> u32 {
    60
}
fn default_ns_ttl() -> u32 {
    3600
}
fn default_ttl() -> u32 {
    1
}
fn default_load_threshold() -> u32 {
    50
}
fn default_weight() -> u16 {
    1
}
fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_normalised() {
        assert_eq!(hostname("name", "WWW.Example.COM").ok().as_deref(), Some("www.example.com."));
        assert_eq!(hostname("name", "a-b.example.com.").ok().as_deref(), Some("a-b.example.com."));
    }

    #[test]
    fn bad_hostnames_say_why() {
        for (input, why) in [
            ("", "empty"),
            ("a..b.com", "empty label"),
            ("-a.com", "hyphen"),
            ("a_b.com", "letters, digits"),
            ("localhost", "no dot"),
            (&format!("{}.com", "a".repeat(64)), "63"),
        ] {
            let err = hostname("name", input).expect_err(input);
            assert!(err.message_contains(why), "{input:?}: {err:?}");
        }
    }

    #[test]
    fn an_underscore_counts_toward_the_label_limit() {
        let longest = format!("_{}.www.example.com", "a".repeat(62));
        assert_eq!(record_owner("name", &longest).ok(), Some(format!("{longest}.")));
        let too_long = format!("_{}.www.example.com", "a".repeat(63));
        let err = record_owner("name", &too_long).expect_err("a label of 64 bytes");
        assert!(err.message_contains("63"), "{err:?}");
    }

    #[test]
    fn service_labels() {
        assert_eq!(service_label("service", "_HTTP").ok().as_deref(), Some("http"));
        assert!(service_label("service", "").is_err());
        assert!(service_label("service", "a b").is_err());
    }

    #[test]
    fn unusable_ips_refused() {
        for ip in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1"] {
            assert!(usable_ip("ip", ip.parse().expect("ip")).is_err(), "{ip}");
        }
        assert!(usable_ip("ip", "198.18.0.1".parse().expect("ip")).is_ok());
    }

    #[test]
    fn forwarding_updates_merge_and_are_checked() {
        let current = admin::Forwarding {
            ports: vec![],
            policy: "round_robin".into(),
            proxy_protocol: "off".into(),
            max_flows: 100,
            max_flows_per_client: 10,
        };
        let update: Forwarding =
            serde_json::from_str(r#"{"ports":[443,80],"policy":"least_connections","proxy_protocol":"tcp_udp"}"#)
                .expect("update");
        let next = forwarding(current.clone(), update).expect("valid");
        assert_eq!(next.ports, [80, 443]);
        assert_eq!((next.policy.as_str(), next.proxy_protocol.as_str()), ("least_connections", "tcp_udp"));
        assert_eq!((next.max_flows, next.max_flows_per_client), (100, 10));
        for (json, why) in [
            (r#"{"ports":[0]}"#, "0 is not a port"),
            (r#"{"ports":[80,80]}"#, "80 is listed twice"),
            (r#"{"max_flows":0}"#, "max_flows: 0"),
            (r#"{"max_flows":5,"max_flows_per_client":6}"#, "above max_flows (5)"),
            (r#"{"max_flows_per_client":101}"#, "above max_flows (100)"),
        ] {
            let update: Forwarding = serde_json::from_str(json).expect(json);
            let err = forwarding(current.clone(), update).expect_err(json);
            assert!(err.message_contains(why), "{json}: {err:?}");
        }
        let update: Forwarding = serde_json::from_str(r#"{"max_flows":5}"#).expect("update");
        assert_eq!(forwarding(current.clone(), update).map(|f| f.max_flows_per_client).ok(), Some(5));
        assert!(serde_json::from_str::<Forwarding>(r#"{"policy":"fastest"}"#).is_err());
        assert!(serde_json::from_str::<Forwarding>(r#"{"ports":[70000]}"#).is_err());
        assert!(serde_json::from_str::<Forwarding>(r#"{"port":[80]}"#).is_err());
    }

    #[test]
    fn check_shapes() {
        let tcp: Check = serde_json::from_str(r#"{"kind":"tcp","port":443}"#).expect("tcp check");
        assert!(matches!(tcp, Check::Tcp { port: 443, .. }));
        assert!(serde_json::from_str::<Check>(r#"{"kind":"icmp"}"#).is_err());
        assert!(serde_json::from_str::<Check>(r#"{"kind":"tcp","port":1,"x":2}"#).is_err());
    }
}

/// Most TXT records per domain.
pub(super) const MAX_TXT: usize = 32;
/// Longest TXT value, characters.
pub(super) const MAX_TXT_VALUE: usize = 1024;

/// A TXT record as a subscriber writes it: the owner (the domain when left out) and the text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TxtSpec {
    pub(super) name: Option<String>,
    pub(super) value: String,
    #[serde(default = "default_txt_ttl")]
    pub(super) ttl: u32,
}

fn default_txt_ttl() -> u32 {
    60
}

/// A TXT value: 1 to [`MAX_TXT_VALUE`] printable ASCII characters (no control characters).
pub(super) fn txt_value(field: &str, value: &str) -> Result<String, ApiError> {
    if value.is_empty() || value.chars().count() > MAX_TXT_VALUE {
        return Err(ApiError::invalid(format!("{field}: 1 to {MAX_TXT_VALUE} characters")));
    }
    if !value.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
        return Err(ApiError::invalid(format!("{field}: printable ASCII only")));
    }
    Ok(value.to_owned())
}
