//! NOTIFY (RFC 1996): as soon as a view with a new serial is published, every NOTIFY target of the zone (and the
//! configuration's `also_notify`) is told, signed with TSIG when the target has a key. Per target only the newest
//! serial is pending (changes coalesce); it is sent again after 1, 2, 4, 8, 16 and 32 s, then every minute, until
//! the target answers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType, TSigner},
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{TsigKey, policy::key_name};
use crate::{metrics::Metrics, sync::Shared, view::View};

/// Attempts after which an unanswered NOTIFY is logged as a warning.
pub const ATTEMPTS: u32 = 6;
/// Wait before the first retry; doubled after each, up to [`LAST_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts.
pub const LAST_RETRY: Duration = Duration::from_secs(60);

/// One target of one zone.
struct Pending {
    origin: Name,
    serial: u32,
    soa: Option<hickory_proto::rr::Record>,
    signer: Option<TSigner>,
    /// `None` once acknowledged (or given up).
    due: Option<Instant>,
    attempts: u32,
    id: u16,
    sent_at: Instant,
}

/// Sends NOTIFY for every serial change of the views `shared` publishes, until `shutdown`.
pub async fn run(
    shared: Arc<Shared>,
    also_notify: Vec<SocketAddr>,
    config_keys: Arc<[TsigKey]>,
    shutdown: CancellationToken,
) {
    let mut published = shared.subscribe();
    let v4 = UdpSocket::bind(("0.0.0.0", 0)).await;
    let v6 = UdpSocket::bind(("::", 0)).await;
    let (v4, v6) = match (v4, v6) {
        (Err(error), Err(_)) => {
            warn!(%error, "cannot bind a UDP socket for NOTIFY; secondaries learn of changes at their refresh");
            return;
        }
        (v4, v6) => (v4.ok(), v6.ok()),
    };
    let mut pending: HashMap<(i64, SocketAddr), Pending> = HashMap::new();
    // The view loaded before this task started: its zones' targets hear of the current serial at once (they may
    // have missed changes while this server was down).
    track(&shared.view.load_full(), &also_notify, &config_keys, &mut pending);
    let (mut buf4, mut buf6) = (vec![0_u8; 4096], vec![0_u8; 4096]);
    loop {
        let due = pending.values().filter_map(|p| p.due).min();
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = shared.view.load_full();
                track(&view, &also_notify, &config_keys, &mut pending);
            }
            Some((len, from)) = recv(v4.as_ref(), &mut buf4) => acknowledge(&buf4[..len], from, &mut pending, &shared.metrics),
            Some((len, from)) = recv(v6.as_ref(), &mut buf6) => acknowledge(&buf6[..len], from, &mut pending, &shared.metrics),
            () = sleep_until(due) => {}
        }
        let now = Instant::now();
        for ((_, target), p) in &mut pending {
            if p.due.is_some_and(|due| due <= now) {
                let socket = if target.is_ipv4() { v4.as_ref() } else { v6.as_ref() };
                send(socket, *target, p, now, &shared.metrics).await;
            }
        }
    }
}

/// Brings `pending` in line with `view`: a new serial (or a new target) is due now; gone zones and targets leave.
fn track(
    view: &View,
    also_notify: &[SocketAddr],
    config_keys: &[TsigKey],
    pending: &mut HashMap<(i64, SocketAddr), Pending>,
) {
    let mut wanted = HashMap::new();
    for zone in view.zones() {
        let policy = &zone.row().transfer;
        if policy.is_empty() {
            continue;
        }
        let targets = policy
            .notify
            .iter()
            .map(|t| (t.addr, t.key.as_deref()))
            .chain(also_notify.iter().map(|addr| (*addr, None)));
        for (addr, key) in targets {
            let signer = key.and_then(|key| {
                let name = key_name(key).ok()?;
                policy
                    .signer(&name)
                    .or_else(|| config_keys.iter().filter_map(|k| k.signer().ok()).find(|s| *s.signer_name() == name))
            });
            wanted.insert((zone.row().id, addr), (zone.clone(), signer));
        }
    }
    pending.retain(|key, _| wanted.contains_key(key));
    let now = Instant::now();
    for (key, (zone, signer)) in wanted {
        let serial = zone.serial();
        let soa = zone.xfr().map(|x| x.published.soa.clone());
        match pending.get_mut(&key) {
            Some(p) if p.serial == serial => p.signer = signer,
            Some(p) => {
                *p = Pending { serial, soa, signer, due: Some(now), attempts: 0, ..fresh(zone.row().origin.clone()) };
            }
            None => {
                pending
                    .insert(key, Pending { serial, soa, signer, due: Some(now), ..fresh(zone.row().origin.clone()) });
            }
        }
    }
}

fn fresh(origin: Name) -> Pending {
    Pending { origin, serial: 0, soa: None, signer: None, due: None, attempts: 0, id: 0, sent_at: Instant::now() }
}

/// Sends one NOTIFY for `p` to `target` and schedules the next attempt.
async fn send(socket: Option<&UdpSocket>, target: SocketAddr, p: &mut Pending, now: Instant, metrics: &Metrics) {
    if p.attempts == ATTEMPTS {
        warn!(zone = %p.origin, %target, serial = p.serial, "NOTIFY not acknowledged; retrying every minute");
        Metrics::count(&metrics.notifies, "unanswered");
    }
    p.id = rand::random();
    p.attempts = p.attempts.saturating_add(1);
    p.sent_at = now;
    p.due = Some(now + retry_after(p.attempts));
    let Some(socket) = socket else {
        debug!(%target, "no socket of this address family for NOTIFY");
        return;
    };
    match encode(p) {
        Ok(bytes) => match socket.send_to(&bytes, target).await {
            Ok(_) => Metrics::count(&metrics.notifies, "sent"),
            Err(error) => debug!(%error, %target, "NOTIFY not sent"),
        },
        Err(error) => {
            warn!(%error, zone = %p.origin, "cannot build NOTIFY");
            p.due = None;
        }
    }
}

/// The wait after attempt `attempt` (1-based): 1 s doubled each time, at most [`LAST_RETRY`].
fn retry_after(attempt: u32) -> Duration {
    FIRST_RETRY.saturating_mul(2_u32.saturating_pow(attempt.saturating_sub(1))).min(LAST_RETRY)
}

fn encode(p: &Pending) -> Result<Vec<u8>, String> {
    let mut message = Message::new(p.id, MessageType::Query, OpCode::Notify);
    message.metadata.authoritative = true;
    message.add_query(Query::query(p.origin.clone(), RecordType::SOA));
    if let Some(soa) = &p.soa {
        message.add_answer(soa.clone());
    }
    if let Some(signer) = &p.signer {
        let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
        let (signature, _) = signer.sign_message(&message, now).map_err(|e| e.to_string())?;
        message.signature = Some(signature);
    }
    message.to_vec().map_err(|e| e.to_string())
}

/// Marks the target's pending NOTIFY acknowledged when `bytes` is its answer.
fn acknowledge(bytes: &[u8], from: SocketAddr, pending: &mut HashMap<(i64, SocketAddr), Pending>, metrics: &Metrics) {
    let Ok(message) = Message::from_vec(bytes) else {
        debug!(%from, "undecodable datagram on the NOTIFY socket");
        return;
    };
    if message.metadata.message_type != MessageType::Response || message.metadata.op_code != OpCode::Notify {
        return;
    }
    let id = message.metadata.id;
    let Some(((_, target), p)) =
        pending.iter_mut().find(|((_, target), p)| *target == from && p.id == id && p.due.is_some())
    else {
        return;
    };
    p.due = None;
    let rcode = message.metadata.response_code;
    if rcode == ResponseCode::NoError {
        Metrics::count(&metrics.notifies, "acknowledged");
        info!(zone = %p.origin, %target, serial = p.serial, after_ms = p.sent_at.elapsed().as_millis() as u64, "NOTIFY acknowledged");
    } else {
        Metrics::count(&metrics.notifies, "refused");
        warn!(zone = %p.origin, %target, serial = p.serial, %rcode, "NOTIFY refused by the secondary");
    }
}

async fn recv(socket: Option<&UdpSocket>, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|a| retry_after(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_after(u32::MAX), LAST_RETRY);
    }

    #[test]
    fn a_notify_carries_the_zone_and_its_soa_and_verifies_with_its_key() {
        let key: TsigKey = serde_json::from_value(serde_json::json!({
            "name": "k1", "secret": "c2VjcmV0LXNlY3JldC1zZWNyZXQtMzItYnl0ZXMhIQ==",
        }))
        .expect("key");
        let signer = key.signer().expect("signer");
        let p = Pending {
            serial: 9,
            signer: Some(signer.clone()),
            id: 77,
            ..fresh(Name::from_ascii("ho.test.").expect("name"))
        };
        let bytes = encode(&p).expect("encodes");
        let message = Message::from_vec(&bytes).expect("decodes");
        assert_eq!(message.metadata.op_code, OpCode::Notify);
        assert!(message.metadata.authoritative);
        assert_eq!(message.queries[0].query_type(), RecordType::SOA);
        assert!(message.signature.is_some());
        signer.verify_message_byte(&bytes, None, true).expect("the signature verifies");
    }
}
