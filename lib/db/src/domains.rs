//! The domain reader that dns and the packet-forwarder share: a domain's row, its addresses and its service tuples,
//! read in one snapshot and assembled per domain. Each server brings its own SQL columns and row model ([`Domain`]).

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction, postgres::PgRow};

use crate::StoreError;

/// Why one row could not be read; such a row is skipped and logged, never fatal.
pub type RowError = Box<dyn std::error::Error + Send + Sync>;

/// One server's model of a domain and how it reads one from rows.
///
/// Each query takes `$1 bigint[]`: NULL for every domain, or the ids to read.
pub trait Domain: Sized {
    /// One address of the domain.
    type Address;
    /// One service tuple of the domain.
    type Service;
    /// Selects `domains` rows.
    const DOMAINS: &'static str;
    /// Selects `addresses` rows with their `domain_id`.
    const ADDRESSES: &'static str;
    /// Selects `services` rows with their `domain_id`.
    const SERVICES: &'static str;

    /// The domain's row id.
    fn id(&self) -> i64;
    /// Reads a `domains` row, with no addresses or services yet.
    fn domain(row: &PgRow) -> Result<Self, RowError>;
    /// Reads an `addresses` row: its domain's id and the address.
    fn address(row: &PgRow) -> Result<(i64, Self::Address), RowError>;
    /// Reads a `services` row; `None` for a tuple this server has no use for.
    fn service(row: &PgRow) -> Result<Option<(i64, Self::Service)>, RowError>;
    /// Adds an address read for this domain.
    fn add_address(&mut self, address: Self::Address);
    /// Adds a service tuple read for this domain.
    fn add_service(&mut self, service: Self::Service);
}

/// A read-only transaction that sees one consistent snapshot.
pub async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    Ok(tx)
}

/// Every domain (`ids` = `None`) or the named ones that still exist, from one snapshot.
pub async fn read<D: Domain>(pool: &PgPool, ids: Option<&[i64]>) -> Result<Vec<D>, StoreError> {
    let mut tx = snapshot(pool).await?;
    let domains = read_in::<D>(&mut tx, ids).await?;
    tx.commit().await?;
    Ok(domains)
}

/// [`read`] inside a snapshot the caller holds (to read more in the same snapshot).
pub async fn read_in<D: Domain>(
    tx: &mut Transaction<'static, Postgres>,
    ids: Option<&[i64]>,
) -> Result<Vec<D>, StoreError> {
    let domains = sqlx::query(D::DOMAINS).bind(ids).fetch_all(&mut **tx).await?;
    let addresses = sqlx::query(D::ADDRESSES).bind(ids).fetch_all(&mut **tx).await?;
    let services = sqlx::query(D::SERVICES).bind(ids).fetch_all(&mut **tx).await?;
    Ok(assemble(&domains, &addresses, &services))
}

/// Reads each row with `read`, skipping (and logging) the unreadable ones.
pub fn rows<T>(rows: &[PgRow], what: &str, read: impl Fn(&PgRow) -> Result<T, RowError>) -> Vec<T> {
    rows.iter()
        .filter_map(|row| match read(row) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::error!(%error, what, "skipping an unreadable row");
                None
            }
        })
        .collect()
}

fn assemble<D: Domain>(domains: &[PgRow], addresses: &[PgRow], services: &[PgRow]) -> Vec<D> {
    let mut by_id: HashMap<i64, D> =
        rows(domains, "domain", D::domain).into_iter().map(|domain| (domain.id(), domain)).collect();
    for (id, address) in rows(addresses, "address", D::address) {
        if let Some(domain) = by_id.get_mut(&id) {
            domain.add_address(address);
        }
    }
    for (id, service) in rows(services, "service", D::service).into_iter().flatten() {
        if let Some(domain) = by_id.get_mut(&id) {
            domain.add_service(service);
        }
    }
    let mut domains: Vec<D> = by_id.into_values().collect();
    domains.sort_by_key(D::id);
    domains
}
