//! Enrolled NCUs, found by the SHA-256 of their client certificate: how hds and hbs know who connected.

use sqlx::{PgPool, Row};

use crate::StoreError;

/// An enrolled NCU, found by its certificate.
#[derive(Debug, Clone)]
pub struct Ncu {
    /// Its `ncus` row.
    pub id: i64,
    /// The domain's row.
    pub domain_id: i64,
    /// The domain it serves.
    pub domain: String,
}

/// The enrolled NCU holding the certificate with this fingerprint; marks it seen. A renewed certificate's first
/// use makes it the NCU's certificate: the one it replaces is refused from then on.
pub async fn by_fingerprint(pool: &PgPool, fingerprint: &[u8; 32]) -> Result<Option<Ncu>, StoreError> {
    let row = sqlx::query(
        "UPDATE ncus n SET last_seen = now(), \
           cert_fingerprint = CASE WHEN n.next_fingerprint = $1 THEN $1 ELSE n.cert_fingerprint END, \
           next_certificate = CASE WHEN n.next_fingerprint = $1 THEN NULL ELSE n.next_certificate END, \
           next_csr_hash = CASE WHEN n.next_fingerprint = $1 THEN NULL ELSE n.next_csr_hash END, \
           next_fingerprint = CASE WHEN n.next_fingerprint = $1 THEN NULL ELSE n.next_fingerprint END \
         FROM domains d WHERE d.id = n.domain_id AND (n.cert_fingerprint = $1 OR n.next_fingerprint = $1) \
         RETURNING n.id, n.domain_id, d.fqdn",
    )
    .bind(&fingerprint[..])
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(Ncu {
            id: row.try_get("id")?,
            domain_id: row.try_get("domain_id")?,
            domain: row.try_get::<String, _>("fqdn")?.trim_end_matches('.').to_owned(),
        })
    })
    .transpose()
}
