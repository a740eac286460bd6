//! The relay of host migrations on a server's host: a forwarder on the host that holds a migration's old address
//! redirects new flows to it on to the new address ([`tether_nft`]) from the moment it sees the migration (announced
//! or redirecting) until the migration is done or deleted, and reports into the migration's row: that it holds the
//! address (`relay`, `relay_at`), why it cannot (`relay_error`), and the flows redirected (`flows`,
//! `last_flow_at`).
//!
//! A forwarder holds an old address when the address is assigned to its host. The wanted set comes from the sync
//! task after every reload; this task applies it, and reads the counters every [`TICK`] while it holds anything. On
//! shutdown the table is removed: no redirect outlives the process that reports it.

use std::time::Duration;

use sqlx::PgPool;
use tether_nft::{Kernel, Redirect, Report};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often counters are read and a failed apply is retried.
pub const TICK: Duration = Duration::from_secs(1);

/// Runs until `shutdown`; `name` is how this forwarder names itself in the rows it reports into.
pub async fn run(pool: PgPool, name: String, mut wanted: watch::Receiver<Vec<Redirect>>, shutdown: CancellationToken) {
    let mut kernel = Kernel::new(&name);
    let mut tick = tether_config::ticker(TICK);
    while tether_config::next_round(&shutdown, &mut wanted, &mut tick).await {
        let local: Vec<Redirect> =
            wanted.borrow_and_update().iter().filter(|r| tether_nft::is_local(r.from)).cloned().collect();
        let mut reports = kernel.reconcile(local).await;
        reports.extend(kernel.count().await);
        for report in reports {
            if let Err(error) = write(&pool, &name, &report).await {
                warn!(%error, ?report, "cannot report a redirect into its migration; reported again later");
                if let Report::Flows(id, _) = report {
                    kernel.forget(id);
                }
            }
        }
    }
    kernel.clear().await;
}

/// Writes what a report says into the migration's row.
async fn write(pool: &PgPool, name: &str, report: &Report) -> Result<(), sqlx::Error> {
    let query = match report {
        Report::Held(id) => sqlx::query(
            "UPDATE host_migrations SET relay = $2, relay_at = COALESCE(relay_at, now()), relay_error = NULL \
             WHERE id = $1",
        )
        .bind(id)
        .bind(name),
        Report::Failed(id, why) => sqlx::query("UPDATE host_migrations SET relay = $2, relay_error = $3 WHERE id = $1")
            .bind(id)
            .bind(name)
            .bind(why),
        Report::Flows(id, flows) => {
            sqlx::query("UPDATE host_migrations SET flows = GREATEST(flows, $2), last_flow_at = now() WHERE id = $1")
                .bind(id)
                .bind(i64::try_from(*flows).unwrap_or(i64::MAX))
        }
        Report::Released(id) => {
            debug!(migration = id, "released");
            return Ok(());
        }
    };
    query.execute(pool).await.map(|_| ())
}
