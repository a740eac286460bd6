//! Host migrations moving this site: while a migration moves the domain away from one of this router's uplink
//! addresses, the heartbeat server sends the redirect ([`control::Redirect`]); new flows reaching that address on
//! the migration's ports are sent on to the new address by the kernel ([`tether_nft`]), established connections
//! stay where they are, and what was redirected goes back to the heartbeat server as [`ToHbs::Redirected`].

use std::time::Duration;

use tether_nft::{Kernel, Redirect, Report};
use tether_proto::control::{self, ToHbs};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// How often counters are read and a failed apply is retried.
pub const TICK: Duration = Duration::from_secs(1);

/// Holds the redirects `wanted` asks for until `shutdown`, then removes them; reports go to `reports`.
pub async fn run(
    mut wanted: watch::Receiver<Vec<control::Redirect>>,
    reports: mpsc::UnboundedSender<ToHbs>,
    shutdown: CancellationToken,
) {
    let mut kernel = Kernel::new("this router");
    let mut flows = std::collections::BTreeMap::<i64, u64>::new();
    let mut not_here = std::collections::BTreeSet::<i64>::new();
    let mut tick = tether_config::ticker(TICK);
    while tether_config::next_round(&shutdown, &mut wanted, &mut tick).await {
        let mut local = Vec::new();
        for r in wanted.borrow_and_update().iter() {
            if tether_nft::is_local(r.from) {
                not_here.remove(&r.id);
                local.push(Redirect { id: r.id, from: r.from, to: r.to, ports: r.ports.clone() });
            } else if not_here.insert(r.id) {
                let error = format!("{} (uplink {}) is not an address of this router", r.from, r.uplink);
                tracing::warn!(migration = r.id, %error, "cannot redirect");
                let _ = reports.send(ToHbs::Redirected { id: r.id, flows: 0, error: Some(error) });
            }
        }
        let mut changes = kernel.reconcile(local).await;
        changes.extend(kernel.count().await);
        for change in changes {
            let message = match change {
                Report::Held(id) => ToHbs::Redirected { id, flows: flows.get(&id).copied().unwrap_or(0), error: None },
                Report::Failed(id, why) => {
                    ToHbs::Redirected { id, flows: flows.get(&id).copied().unwrap_or(0), error: Some(why) }
                }
                Report::Flows(id, n) => {
                    flows.insert(id, n);
                    ToHbs::Redirected { id, flows: n, error: None }
                }
                Report::Released(id) => {
                    flows.remove(&id);
                    continue;
                }
            };
            let _ = reports.send(message);
        }
    }
    kernel.clear().await;
}
