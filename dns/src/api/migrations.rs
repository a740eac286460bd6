//! Host migrations: `POST`, `GET` and `DELETE` under `/v1/domains/{name}/migrations`. The phases are moved on by
//! [`crate::migrate`]; the relay at the old address reports into the same row.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    AppState, Caller, created,
    error::{ApiError, Body, Path},
    input::{self, display},
    routes::owned_domain,
};
use crate::store::{
    admin,
    migration::{self, Migration, NewMigration},
};

/// The operator's migration defaults and the private ranges it opened.
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    /// Default hold: this many times the name's longest TTL.
    pub hold_factor: u32,
    /// Default quiet time.
    pub quiet: Duration,
}

/// Longest hold or quiet time: a week.
const MAX_SECONDS: u32 = 604_800;

pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<input::NewMigration>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let shown = display(&domain.fqdn).to_owned();
    let settings = &state.migrations;
    let from = body.from.to_canonical();
    let targets = &state.shared.targets;
    let to = input::target_ip("to", body.to, targets)?;
    let temporary = body.temporary.map(|ip| input::target_ip("temporary", ip, targets)).transpose()?;
    if from == to {
        return Err(ApiError::invalid("to: must differ from from"));
    }
    if from.is_ipv4() != to.is_ipv4() || temporary.is_some_and(|t| t.is_ipv4() != from.is_ipv4()) {
        return Err(ApiError::invalid("from, to and temporary must be of one address family"));
    }
    if temporary.is_some_and(|t| t == from || t == to) {
        return Err(ApiError::invalid("temporary: must differ from from and to"));
    }

    let addresses = admin::addresses(&state.pool, domain.id).await?;
    let state_of = |ip: IpAddr| addresses.iter().find(|a| a.ip == ip).map(|a| a.state.as_str());
    if state_of(from).is_none() {
        return Err(ApiError::invalid(format!("from: {from} is not an address of {shown}")));
    }
    match state_of(to) {
        Some("live") => {}
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "to: {to} is {other}, not live: a migration moves only to a live address"
            )));
        }
        None => {
            return Err(ApiError::invalid(format!(
                "to: {to} is not an address of {shown}: add it first (a worse priority keeps it out of the answers \
                 until the move)"
            )));
        }
    }
    if let Some(temporary) = temporary
        && domain.static_ip != Some(temporary)
        && state_of(temporary) != Some("live")
    {
        return Err(ApiError::invalid(format!(
            "temporary: {temporary} is neither the static address nor a live address of {shown}"
        )));
    }
    if let Some(earlier) = migration::moved_away_from(&state.pool, domain.id, to).await? {
        return Err(ApiError::conflict(format!(
            "to: migration {earlier} moved {shown} away from {to}; delete that migration first"
        )));
    }

    let ports = match body.ports {
        Some(ports) => ports,
        None => default_ports(&state, domain.id).await?,
    };
    let ports: BTreeSet<u16> = ports.into_iter().collect();
    if ports.is_empty() || ports.len() > 64 || ports.contains(&0) {
        return Err(ApiError::invalid(
            "ports: 1 to 64 ports of 1-65535 to redirect (the domain forwards none and has no service tuples to take \
             them from)",
        ));
    }
    let hold = match body.hold {
        Some(hold) => input::bounded("hold", hold, 0, MAX_SECONDS)?,
        None => {
            let ttl = migration::max_ttl_served(&state.pool, domain.id).await?;
            i32::try_from(ttl.saturating_mul(settings.hold_factor).min(MAX_SECONDS)).unwrap_or(i32::MAX)
        }
    };
    let quiet = match body.quiet {
        Some(quiet) => input::bounded("quiet", quiet, 0, MAX_SECONDS)?,
        None => i32::try_from(settings.quiet.as_secs().min(u64::from(MAX_SECONDS))).unwrap_or(i32::MAX),
    };
    let new = NewMigration {
        domain_id: domain.id,
        from,
        to,
        temporary,
        ports: ports.into_iter().map(i32::from).collect(),
        hold_s: hold,
        quiet_s: quiet,
    };
    let created_row = migration::create(&state.pool, &new).await.map_err(|error| match error {
        crate::store::StoreError::Conflict(_) => {
            ApiError::conflict(format!("{shown} already has a migration under way; finish or delete it first"))
        }
        other => other.into(),
    })?;
    tracing::info!(domain = %shown, migration = created_row.id, %from, %to, "migration announced");
    Ok(created(out(&created_row)))
}

pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let all: Vec<Value> = migration::list(&state.pool, domain.id).await?.iter().map(out).collect();
    Ok(Json(all).into_response())
}

pub(super) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, i64)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    match migration::get(&state.pool, domain.id, id).await? {
        Some(row) => Ok(Json(out(&row)).into_response()),
        None => Err(ApiError::not_found(format!("{} has no migration {id}", display(&domain.fqdn)))),
    }
}

pub(super) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, i64)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    match migration::delete(&state.pool, domain.id, id).await? {
        Some(phase) => {
            let what = if phase == "done" { "migration record deleted" } else { "migration rolled back" };
            tracing::info!(domain = %display(&domain.fqdn), migration = id, %phase, "{what}");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(ApiError::not_found(format!("{} has no migration {id}", display(&domain.fqdn)))),
    }
}

/// The domain's forwarded ports, else its service tuples' ports.
async fn default_ports(state: &AppState, domain_id: i64) -> Result<Vec<u16>, ApiError> {
    let forwarded = admin::forwarding(&state.pool, domain_id).await?.map(|f| f.ports).unwrap_or_default();
    let ports: Vec<i32> = if forwarded.is_empty() {
        admin::services(&state.pool, domain_id).await?.into_iter().map(|s| s.port).collect()
    } else {
        forwarded
    };
    Ok(ports.into_iter().filter_map(|p| u16::try_from(p).ok()).filter(|p| *p != 0).collect())
}

/// A migration as the API shows it: the row, and when it can be done at the earliest.
fn out(row: &Migration) -> Value {
    let mut value = serde_json::to_value(row).unwrap_or_else(|_| json!({}));
    let earliest_done = row.redirect_at.map(|at| {
        let hold = at + chrono::Duration::seconds(i64::from(row.hold_s));
        let quiet = row.last_flow_at.unwrap_or(at) + chrono::Duration::seconds(i64::from(row.quiet_s));
        hold.max(quiet)
    });
    if let Some(object) = value.as_object_mut() {
        object.insert("done_after".into(), json!(if row.phase == "done" { None } else { earliest_done }));
    }
    value
}
