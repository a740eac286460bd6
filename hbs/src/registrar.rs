//! Registrations in batches: while one transaction runs, the registrations arriving meanwhile wait and go together
//! in the next one. A quiet server writes each at once; a failover storm of thousands of NCUs costs a few dozen
//! transactions instead of thousands, each bumping the zone serial (and holding its row lock) only briefly.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
};

use sqlx::PgPool;
use tether_db::StoreError;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    metrics::Metrics,
    store::{self, Outcome, Registration},
};

/// Most registrations written in one transaction.
pub const MAX_BATCH: usize = 512;

/// A registration waiting for its batch.
#[derive(Debug)]
pub struct Job {
    /// What to record.
    pub registration: Registration,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<Outcome, Arc<StoreError>>>,
}

/// Hands `registration` to the registrar and waits for its outcome.
pub async fn submit(
    registrar: &mpsc::UnboundedSender<Job>,
    registration: Registration,
) -> Result<Outcome, Arc<StoreError>> {
    let (reply, outcome) = oneshot::channel();
    let gone = || Arc::new(StoreError::Unavailable(sqlx::Error::PoolClosed));
    registrar.send(Job { registration, reply }).map_err(|_| gone())?;
    outcome.await.map_err(|_| gone())?
}

/// Runs until `shutdown` or until every sender is gone.
pub async fn run(
    pool: PgPool,
    me: String,
    max_addresses: u32,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                job = jobs.recv() => match job {
                    Some(job) => waiting.push_back(job),
                    None => return,
                },
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        let batch = next_batch(&mut waiting);
        let started = std::time::Instant::now();
        write(&pool, &me, max_addresses, batch).await;
        metrics.registration_seconds.observe(started.elapsed().as_secs_f64());
        metrics.registration_batches.inc();
    }
}

/// Takes the oldest registrations, at most [`MAX_BATCH`] and one per NCU (a second one of the same NCU waits for
/// the next batch, so each NCU's registrations apply in order).
fn next_batch(waiting: &mut VecDeque<Job>) -> Vec<Job> {
    let mut batch = Vec::new();
    let mut later = VecDeque::new();
    let mut ncus = BTreeSet::new();
    while let Some(job) = waiting.pop_front() {
        if batch.len() < MAX_BATCH && ncus.insert(job.registration.ncu_id) {
            batch.push(job);
        } else {
            later.push_back(job);
        }
    }
    *waiting = later;
    batch
}

async fn write(pool: &PgPool, me: &str, max_addresses: u32, batch: Vec<Job>) {
    let registrations: Vec<Registration> = batch.iter().map(|job| job.registration.clone()).collect();
    let started = std::time::Instant::now();
    match store::register_batch(pool, me, max_addresses, &registrations).await {
        Ok(outcomes) => {
            debug!(registrations = batch.len(), elapsed = ?started.elapsed(), "registrations written");
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(error) if batch.len() > 1 && !error.is_unavailable() => {
            // One registration may be at fault (the batch rolled back): write each alone so it fails alone.
            warn!(%error, registrations = batch.len(), "batch registration failed; writing one by one");
            for job in batch {
                let result =
                    store::register_batch(pool, me, max_addresses, std::slice::from_ref(&job.registration)).await;
                let _ = job.reply.send(result.map(|mut o| o.pop().unwrap_or_default()).map_err(Arc::new));
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for job in batch {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ncu_id: i64) -> (Job, oneshot::Receiver<Result<Outcome, Arc<StoreError>>>) {
        let (reply, rx) = oneshot::channel();
        (
            Job {
                registration: Registration {
                    ncu_id,
                    domain_id: 1,
                    uplinks: Vec::new(),
                    replace_all: true,
                    generation: 0,
                },
                reply,
            },
            rx,
        )
    }

    #[test]
    fn batches_take_one_registration_per_ncu_in_order() {
        let mut waiting: VecDeque<Job> = [1, 2, 1, 3, 1].into_iter().map(|n| job(n).0).collect();
        let ncus = |jobs: &[Job]| jobs.iter().map(|j| j.registration.ncu_id).collect::<Vec<_>>();
        assert_eq!(ncus(&next_batch(&mut waiting)), vec![1, 2, 3]);
        assert_eq!(ncus(&next_batch(&mut waiting)), vec![1]);
        assert_eq!(ncus(&next_batch(&mut waiting)), vec![1]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn batches_are_bounded() {
        let mut waiting: VecDeque<Job> = (0..MAX_BATCH as i64 + 3).map(|n| job(n).0).collect();
        assert_eq!(next_batch(&mut waiting).len(), MAX_BATCH);
        assert_eq!(next_batch(&mut waiting).len(), 3);
    }
}
