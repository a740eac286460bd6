//! Certificate renewal before expiry: at a point spread over the last third of the certificate's life (so a fleet
//! enrolled together does not renew together), the NCU makes a new key and exchanges its CSR with hds for a new
//! certificate, authenticated by the current one. Failures are retried; the current certificate stays valid until
//! the new one is first used.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{hds_client, identity::Identity};

/// When to renew a certificate valid from `not_before` to `not_after`: after two thirds of its life plus `spread`
/// (0 to 1) of the following sixth, so renewals fall between 2/3 and 5/6 of the lifetime.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, spread: f64) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(2.0 / 3.0 + spread.clamp(0.0, 1.0) / 6.0)
}

/// Longest wait before trying a failed renewal again.
const RETRY_AT_MOST: Duration = Duration::from_secs(600);

/// Renews `identity` (stored in `dir`) whenever it is due, until `shutdown`; each new identity goes to `renewed`.
pub async fn run(
    hds: Vec<String>,
    mut identity: Identity,
    dir: PathBuf,
    renewed: impl Fn(Identity),
    shutdown: CancellationToken,
) {
    let spread = rand::random::<f64>();
    let mut retry = Duration::from_secs(5);
    loop {
        let (not_before, not_after) = match tether_pki::validity(&identity.cert_pem) {
            Ok(validity) => validity,
            Err(error) => {
                warn!(%error, "cannot read the certificate's validity; it will not be renewed");
                return;
            }
        };
        let due = renew_at(not_before, not_after, spread);
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        info!(in_seconds = wait.as_secs(), "certificate renewal scheduled");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        loop {
            match hds_client::renew(&hds, &identity, &dir).await {
                Ok(next) => {
                    info!(dir = %dir.display(), "certificate renewed");
                    identity = next.clone();
                    renewed(next);
                    retry = Duration::from_secs(5);
                    break;
                }
                Err(error) => {
                    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
                    warn!(%error, retry_in = ?retry, expires_in = ?left, "certificate renewal failed");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_AT_MOST);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_fall_in_the_last_third_spread_over_a_sixth() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(90 * 86_400);
        // Days, rounded: the fractions are floating point.
        let day =
            |t: SystemTime| t.duration_since(start).map_or(u64::MAX, |d| (d.as_secs_f64() / 86_400.0).round() as u64);
        assert_eq!(day(renew_at(start, end, 0.0)), 60);
        assert_eq!(day(renew_at(start, end, 0.5)), 68);
        assert_eq!(day(renew_at(start, end, 1.0)), 75);
        assert_eq!(day(renew_at(start, end, 7.0)), 75, "the spread is clamped");
        // An expired or inverted certificate is due at once.
        assert_eq!(renew_at(end, start, 0.3), end);
    }
}
