//! Postgres behind hds: enrollment tokens, enrolled NCUs, the fleet table, and the SRV tuple that publishes hds.

use std::{net::SocketAddr, time::Duration};

use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use tether_db::StoreError;

use crate::assign::{FleetState, Server};

/// A refused enrollment, or a database failure.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token matches no enrollment.
    #[error("unknown enrollment token")]
    UnknownToken,
    /// The token was used before.
    #[error("this enrollment token was already used")]
    TokenUsed,
    /// The token has expired.
    #[error("this enrollment token expired at {0}")]
    TokenExpired(chrono::DateTime<chrono::Utc>),
    /// The CSR could not be signed.
    #[error("unusable certificate request: {0}")]
    BadCsr(String),
    /// Postgres failed or is unreachable.
    #[error(transparent)]
    Database(#[from] StoreError),
}

impl From<sqlx::Error> for EnrollError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error.into())
    }
}

/// What an enrollment created.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The new `ncus` row.
    pub ncu_id: i64,
    /// The domain the NCU serves.
    pub domain: String,
    /// The token was used before with the same CSR: its certificate was given again.
    pub replayed: bool,
}

/// Consumes a one-time token and records the NCU, in one transaction; `sign` makes the certificate (PEM and
/// fingerprint) for the token's domain and runs only once the token is known to be good. A token used before with
/// the same CSR (the reply was lost) gives the same certificate again while it has not expired.
pub async fn enroll<F>(
    pool: &PgPool,
    token: &str,
    csr: &str,
    serial: Option<&str>,
    mac: Option<&str>,
    sign: F,
) -> Result<(Enrolled, String), EnrollError>
where
    F: FnOnce(&str) -> Result<(String, [u8; 32]), String>,
{
    let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let csr_hash: [u8; 32] = Sha256::digest(csr.trim().as_bytes()).into();
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "SELECT e.id, e.domain_id, e.expires_at, e.used_at, e.csr_hash, e.certificate, e.ncu_id, d.fqdn \
         FROM enrollments e JOIN domains d ON d.id = e.domain_id WHERE e.token_hash = $1 FOR UPDATE OF e",
    )
    .bind(&hash[..])
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(EnrollError::UnknownToken);
    };
    let expires_at: chrono::DateTime<chrono::Utc> = row.try_get("expires_at")?;
    let fqdn: String = row.try_get("fqdn")?;
    let domain = fqdn.trim_end_matches('.').to_owned();
    if row.try_get::<Option<chrono::DateTime<chrono::Utc>>, _>("used_at")?.is_some() {
        let same_csr = row.try_get::<Option<Vec<u8>>, _>("csr_hash")?.is_some_and(|h| h == csr_hash);
        let certificate: Option<String> = row.try_get("certificate")?;
        let ncu_id: Option<i64> = row.try_get("ncu_id")?;
        return match (same_csr && expires_at > chrono::Utc::now(), certificate, ncu_id) {
            (true, Some(certificate), Some(ncu_id)) => Ok((Enrolled { ncu_id, domain, replayed: true }, certificate)),
            _ => Err(EnrollError::TokenUsed),
        };
    }
    if expires_at <= chrono::Utc::now() {
        return Err(EnrollError::TokenExpired(expires_at));
    }
    let (certificate, fingerprint) = match sign(&domain) {
        Ok(signed) => signed,
        // The transaction rolls back: the token stays unused, so the NCU may try again with a good CSR.
        Err(reason) => return Err(EnrollError::BadCsr(reason)),
    };
    let ncu_id: i64 = sqlx::query_scalar(
        "INSERT INTO ncus (domain_id, cert_fingerprint, serial_number, mac) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(row.try_get::<i64, _>("domain_id")?)
    .bind(&fingerprint[..])
    .bind(serial)
    .bind(mac)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE enrollments SET used_at = now(), csr_hash = $2, certificate = $3, ncu_id = $4 WHERE id = $1")
        .bind(row.try_get::<i64, _>("id")?)
        .bind(&csr_hash[..])
        .bind(&certificate)
        .bind(ncu_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((Enrolled { ncu_id, domain, replayed: false }, certificate))
}

/// Gives the NCU `ncu_id` its next certificate for `csr`: the one already made for the same CSR (a lost reply), or a
/// new one from `sign`, which replaces any earlier unused next certificate. The current certificate stays valid
/// until the next one is first used.
pub async fn renew<F>(pool: &PgPool, ncu_id: i64, domain: &str, csr: &str, sign: F) -> Result<String, EnrollError>
where
    F: FnOnce(&str) -> Result<(String, [u8; 32]), String>,
{
    let csr_hash: [u8; 32] = Sha256::digest(csr.trim().as_bytes()).into();
    let mut tx = pool.begin().await?;
    let row: Option<(Option<Vec<u8>>, Option<String>)> =
        sqlx::query_as("SELECT next_csr_hash, next_certificate FROM ncus WHERE id = $1 FOR UPDATE")
            .bind(ncu_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((stored_hash, stored_certificate)) = row else {
        return Err(EnrollError::UnknownToken);
    };
    if let (Some(stored), Some(certificate)) = (stored_hash, stored_certificate)
        && stored == csr_hash
    {
        return Ok(certificate);
    }
    let (certificate, fingerprint) = sign(domain).map_err(EnrollError::BadCsr)?;
    sqlx::query(
        "UPDATE ncus SET next_fingerprint = $2, next_certificate = $3, next_csr_hash = $4, renewed_at = now() \
         WHERE id = $1",
    )
    .bind(ncu_id)
    .bind(&fingerprint[..])
    .bind(&certificate)
    .bind(&csr_hash[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(certificate)
}

/// Every row of `heartbeat_servers`, with its age by the database's clock.
pub async fn fleet(pool: &PgPool) -> Result<Vec<Server>, StoreError> {
    let rows = sqlx::query(
        "SELECT name, control_address, capacity, current_load, state::text AS state, \
         GREATEST(EXTRACT(EPOCH FROM now() - last_seen), 0)::float8 AS age FROM heartbeat_servers",
    )
    .fetch_all(pool)
    .await?;
    let mut servers = Vec::with_capacity(rows.len());
    for row in rows {
        let state = match row.try_get::<&str, _>("state")? {
            "active" => FleetState::Active,
            "full" => FleetState::Full,
            _ => FleetState::Draining,
        };
        servers.push(Server {
            name: row.try_get("name")?,
            address: row.try_get("control_address")?,
            capacity: u32::try_from(row.try_get::<i32, _>("capacity")?).unwrap_or(0),
            load: u32::try_from(row.try_get::<i32, _>("current_load")?).unwrap_or(u32::MAX),
            state,
            age: Duration::from_secs_f64(row.try_get::<f64, _>("age")?.max(0.0)),
        });
    }
    Ok(servers)
}

use tether_db::OPERATOR_SUBSCRIBER;

/// Makes sure `_tether-hds._udp.<zone>` carries this instance. False when the zone does not exist.
pub async fn publish(pool: &PgPool, zone: &str, address: SocketAddr) -> Result<bool, StoreError> {
    let fqdn = format!("{}.", zone.trim_end_matches('.').to_ascii_lowercase());
    let mut tx = pool.begin().await?;
    let Some(zone_id) = sqlx::query_scalar::<_, i64>("SELECT id FROM zones WHERE origin = $1")
        .bind(&fqdn)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(false);
    };
    // An unguessable token hash: nobody can log in as this subscriber.
    let unusable: [u8; 32] = Sha256::digest(rand::random::<[u8; 32]>()).into();
    let subscriber: i64 = sqlx::query_scalar(
        "INSERT INTO subscribers (name, token_hash) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .bind(OPERATOR_SUBSCRIBER)
    .bind(&unusable[..])
    .fetch_one(&mut *tx)
    .await?;
    let domain: i64 = sqlx::query_scalar(
        "INSERT INTO domains (fqdn, zone_id, subscriber_id) VALUES ($1, $2, $3) \
         ON CONFLICT (fqdn) DO UPDATE SET fqdn = EXCLUDED.fqdn RETURNING id",
    )
    .bind(&fqdn)
    .bind(zone_id)
    .bind(subscriber)
    .fetch_one(&mut *tx)
    .await?;
    let present: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM services WHERE domain_id = $1 AND service = 'tether-hds' \
         AND transport = 'udp' AND ip = $2 AND port = $3)",
    )
    .bind(domain)
    .bind(address.ip())
    .bind(i32::from(address.port()))
    .fetch_one(&mut *tx)
    .await?;
    if !present {
        sqlx::query(
            "INSERT INTO services (domain_id, service, transport, ip, port, priority, weight) \
             VALUES ($1, 'tether-hds', 'udp', $2, $3, 0, 1)",
        )
        .bind(domain)
        .bind(address.ip())
        .bind(i32::from(address.port()))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Removes this instance's SRV tuple, at shutdown.
pub async fn unpublish(pool: &PgPool, zone: &str, address: SocketAddr) -> Result<(), StoreError> {
    let fqdn = format!("{}.", zone.trim_end_matches('.').to_ascii_lowercase());
    sqlx::query(
        "DELETE FROM services s USING domains d WHERE d.id = s.domain_id AND d.fqdn = $1 \
         AND s.service = 'tether-hds' AND s.transport = 'udp' AND s.ip = $2 AND s.port = $3",
    )
    .bind(&fqdn)
    .bind(address.ip())
    .bind(i32::from(address.port()))
    .execute(pool)
    .await?;
    Ok(())
}
