//! Handlers of the admin API.

use std::net::IpAddr;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    AppState, Caller, created,
    error::{ApiError, Body, Path},
    input::{self, display},
    new_token, token_hash,
};
use crate::{
    store::{self, admin},
    xfr::{self, TransferPolicy},
};

/// A domain with its addresses and services.
#[derive(Serialize)]
struct DomainOut {
    name: String,
    zone: String,
    subscriber_id: i64,
    static_ip: Option<IpAddr>,
    ttl: i32,
    fallback_ip: Option<IpAddr>,
    when_empty: String,
    load_threshold_pct: i32,
    created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    addresses: Option<Vec<admin::AddressRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    services: Option<Vec<admin::Service>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ncus: Option<Vec<admin::NcuRow>>,
}

pub(super) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../../openapi.json")).into_response()
}

pub(super) async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

pub(super) async fn create_subscriber(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body<input::NewSubscriber>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name: 1-200 printable characters"));
    }
    let token = new_token("tsub");
    let subscriber = admin::create_subscriber(&state.pool, name, &token_hash(&token))
        .await
        .map_err(|e| conflict_as(e, format!("subscriber {name:?} exists")))?;
    tracing::info!(id = subscriber.id, "subscriber created");
    Ok(created(json!({ "id": subscriber.id, "name": subscriber.name, "token": token })))
}

pub(super) async fn create_zone(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body<input::NewZone>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let origin = input::hostname("origin", &body.origin)?;
    if body.nameservers.is_empty() {
        return Err(ApiError::invalid("nameservers: at least one is needed"));
    }
    let mut nameservers = Vec::with_capacity(body.nameservers.len());
    for spec in body.nameservers {
        let (name, ips) = match spec {
            input::NameserverSpec::Name(name) => (name, Vec::new()),
            input::NameserverSpec::WithGlue(ns) => (ns.name, ns.ips),
        };
        let name = input::hostname("nameservers", &name)?;
        let inside = name == origin || name.ends_with(&format!(".{origin}"));
        if !ips.is_empty() && !inside {
            return Err(ApiError::invalid(format!(
                "nameservers: glue for {} which is outside the zone",
                display(&name)
            )));
        }
        for ip in &ips {
            input::usable_ip("nameservers.ips", *ip)?;
        }
        nameservers.push(crate::view::Nameserver { name, ips });
    }
    let hostmaster = match &body.hostmaster {
        Some(h) => input::hostname("hostmaster", &h.replacen('@', ".", 1))?,
        None => format!("hostmaster.{origin}"),
    };
    let zone = admin::NewZone {
        origin: origin.clone(),
        nameservers,
        hostmaster,
        timers: [
            input::bounded("refresh", body.refresh, 1, 2_147_483_647)?,
            input::bounded("retry", body.retry, 1, 2_147_483_647)?,
            input::bounded("expire", body.expire, 1, 2_147_483_647)?,
            input::bounded("minimum", body.minimum, 0, 86_400)?,
        ],
        soa_ttl: input::bounded("soa_ttl", body.soa_ttl, 0, 86_400)?,
        ns_ttl: input::bounded("ns_ttl", body.ns_ttl, 0, 604_800)?,
    };
    let zone = admin::create_zone(&state.pool, &zone)
        .await
        .map_err(|e| conflict_as(e, format!("zone {} exists", display(&origin))))?;
    tracing::info!(origin = %zone.origin, "zone created");
    Ok(created(zone_out(zone)))
}

pub(super) async fn list_zones(State(state): State<AppState>, _caller: Caller) -> Result<Response, ApiError> {
    let zones: Vec<Value> = admin::list_zones(&state.pool).await?.into_iter().map(zone_out).collect();
    Ok(Json(zones).into_response())
}

pub(super) async fn get_transfer(
    State(state): State<AppState>,
    caller: Caller,
    Path(origin): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let origin = path_name(&origin)?;
    let policy = admin::zone_transfer(&state.pool, &origin)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no zone {}", display(&origin))))?;
    Ok(Json(policy.masked()).into_response())
}

pub(super) async fn put_transfer(
    State(state): State<AppState>,
    caller: Caller,
    Path(origin): Path<String>,
    Body(policy): Body<TransferPolicy>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let origin = path_name(&origin)?;
    let in_config = |name: &hickory_server::proto::rr::Name| {
        state.tsig_keys.iter().any(|k| xfr::policy::key_name(&k.name).ok().as_ref() == Some(name))
    };
    policy.validate(&in_config).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !admin::set_zone_transfer(&state.pool, &origin, &policy).await? {
        return Err(ApiError::not_found(format!("no zone {}", display(&origin))));
    }
    tracing::info!(
        zone = %origin,
        secondaries = policy.secondaries.len(),
        notify = policy.notify.len(),
        keys = policy.keys.len(),
        "transfer policy replaced"
    );
    Ok(Json(policy.masked()).into_response())
}

pub(super) async fn create_domain(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body<input::NewDomain>,
) -> Result<Response, ApiError> {
    let subscriber_id = match (caller, body.subscriber_id) {
        (Caller::Subscriber(id), None) => id,
        (Caller::Subscriber(id), Some(other)) if other == id => id,
        (Caller::Subscriber(_), Some(_)) => {
            return Err(ApiError::forbidden("subscriber_id: you may create domains only for yourself"));
        }
        (Caller::Operator, Some(id)) => {
            if !admin::subscriber_exists(&state.pool, id).await? {
                return Err(ApiError::invalid(format!("subscriber_id: no subscriber {id}")));
            }
            id
        }
        (Caller::Operator, None) => {
            return Err(ApiError::invalid("subscriber_id: required when the operator creates a domain"));
        }
    };
    let fqdn = input::hostname("name", &body.name)?;
    let static_ip = body.static_ip.map(|ip| input::usable_ip("static_ip", ip)).transpose()?;
    let fallback_ip =
        body.fallback_ip.map(|ip| input::target_ip("fallback_ip", ip, &state.shared.targets)).transpose()?;
    let ttl = input::bounded("ttl", body.ttl, 0, 86_400)?;
    let load_threshold_pct = input::bounded("load_threshold_pct", body.load_threshold_pct, 1, 10_000)?;
    let Some(zone_id) = admin::zone_for(&state.pool, &fqdn).await? else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "outside_zones",
            format!("name: {} is in none of our zones", display(&fqdn)),
        ));
    };
    owns_the_name(&state, caller, zone_id, &fqdn, subscriber_id, static_ip).await?;
    let when_empty = match body.when_empty {
        input::WhenEmpty::Nodata => "nodata",
        input::WhenEmpty::LastKnown => "last_known",
    };
    let domain = admin::NewDomain {
        fqdn: fqdn.clone(),
        subscriber_id,
        static_ip,
        ttl,
        fallback_ip,
        when_empty: when_empty.into(),
        load_threshold_pct,
    };
    let domain = admin::create_domain(&state.pool, zone_id, &domain, state.bounds.domains_per_subscriber)
        .await
        .map_err(|e| conflict_as(e, format!("domain {} exists", display(&fqdn))))?;
    tracing::info!(domain = %domain.fqdn, subscriber_id, "domain created");
    Ok(created(domain_out(domain, None, None)))
}

pub(super) async fn list_domains(State(state): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let filter = match caller {
        Caller::Operator => None,
        Caller::Subscriber(id) => Some(id),
    };
    let domains: Vec<DomainOut> =
        admin::list_domains(&state.pool, filter).await?.into_iter().map(|d| domain_out(d, None, None)).collect();
    Ok(Json(domains).into_response())
}

pub(super) async fn get_domain(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let addresses = admin::addresses(&state.pool, domain.id).await?;
    let services = admin::services(&state.pool, domain.id).await?;
    let ncus = admin::ncus(&state.pool, domain.id).await?;
    let mut out = domain_out(domain, Some(addresses), Some(services));
    out.ncus = Some(ncus);
    Ok(Json(out).into_response())
}

pub(super) async fn delete_domain(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    admin::delete_domain(&state.pool, domain.id).await?;
    tracing::info!(domain = %domain.fqdn, "domain deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn add_address(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<input::NewAddress>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let ip = input::target_ip("ip", body.ip, &state.shared.targets)?;
    if body.weight == 0 {
        return Err(ApiError::invalid("weight: must be at least 1"));
    }
    if let Some(check) = &body.check {
        check.validate(ip)?;
        if admin::checks(&state.pool, domain.id).await? >= input::MAX_CHECKS {
            return Err(ApiError::invalid(format!(
                "check: at most {} checked addresses per domain",
                input::MAX_CHECKS
            )));
        }
    }
    let check = body
        .check
        .map(|c| serde_json::to_value(c).map_err(|e| ApiError::invalid(format!("check: {e}"))))
        .transpose()?;
    let row = admin::add_static_address(
        &state.pool,
        domain.id,
        ip,
        i32::from(body.priority),
        i32::from(body.weight),
        check.as_ref(),
        state.bounds.addresses_per_domain,
    )
    .await
    .map_err(|e| conflict_as(e, format!("{ip} is already an address of {}", display(&domain.fqdn))))?;
    tracing::info!(domain = %domain.fqdn, "static address added");
    Ok(created(row))
}

pub(super) async fn delete_address(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, ip)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", format!("{ip:?} is not an IP address")))?;
    if !admin::delete_address(&state.pool, domain.id, ip).await? {
        return Err(ApiError::not_found(format!("{ip} is not an address of {}", display(&domain.fqdn))));
    }
    tracing::info!(domain = %domain.fqdn, "address deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn put_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<Vec<input::ServiceSpec>>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    if body.len() > input::MAX_SERVICES {
        return Err(ApiError::invalid(format!("at most {} service tuples", input::MAX_SERVICES)));
    }
    let mut services = Vec::with_capacity(body.len());
    for (i, spec) in body.into_iter().enumerate() {
        let service = input::service_label(&format!("[{i}].service"), &spec.service)?;
        if service.starts_with("tether-") && caller != Caller::Operator {
            tracing::warn!(domain = %domain.fqdn, %service, "reserved service name refused");
            return Err(ApiError::forbidden(format!("[{i}].service: names starting with tether- are the operator's")));
        }
        let transport = input::service_label(&format!("[{i}].transport"), &spec.transport)?;
        if !["tcp", "udp", "sctp", "tls"].contains(&transport.as_str()) {
            return Err(ApiError::invalid(format!("[{i}].transport: one of tcp, udp, sctp, tls")));
        }
        let ip = spec.ip.map(|ip| input::usable_ip(&format!("[{i}].ip"), ip)).transpose()?;
        let target = spec.target.map(|t| input::hostname(&format!("[{i}].target"), &t)).transpose()?;
        if ip.is_some() == target.is_some() {
            return Err(ApiError::invalid(format!("[{i}]: give exactly one of ip and target")));
        }
        let tuple = admin::Service {
            service,
            transport,
            ip,
            target,
            port: i32::from(spec.port),
            priority: i32::from(spec.priority),
            weight: i32::from(spec.weight),
            healthy: true,
            health_reason: None,
        };
        if services.contains(&tuple) {
            return Err(ApiError::invalid(format!("[{i}]: duplicate tuple")));
        }
        services.push(tuple);
    }
    admin::replace_services(&state.pool, domain.id, &services).await?;
    tracing::info!(domain = %domain.fqdn, count = services.len(), "services replaced");
    let stored = admin::services(&state.pool, domain.id).await?;
    Ok(Json(services_out(stored)).into_response())
}

pub(super) async fn put_forwarding(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<input::Forwarding>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let not_found = || ApiError::not_found(format!("no domain {}", display(&domain.fqdn)));
    let current = admin::forwarding(&state.pool, domain.id).await?.ok_or_else(not_found)?;
    let next = input::forwarding(current, body)?;
    let stored = admin::set_forwarding(&state.pool, domain.id, &next).await?.ok_or_else(not_found)?;
    tracing::info!(domain = %domain.fqdn, "forwarding settings replaced");
    Ok(Json(stored).into_response())
}

pub(super) async fn create_enrollment(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let token = new_token("tenr");
    let ttl = chrono::Duration::from_std(state.enrollment_ttl).unwrap_or(chrono::Duration::hours(1));
    let expires_at = chrono::Utc::now() + ttl;
    admin::create_enrollment(
        &state.pool,
        domain.id,
        &token_hash(&token),
        expires_at,
        state.bounds.addresses_per_domain,
    )
    .await?;
    tracing::info!(domain = %domain.fqdn, "enrollment token issued");
    Ok(created(json!({ "token": token, "expires_at": expires_at })))
}

pub(super) async fn get_txt(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    Ok(Json(txt_out(admin::txt_records(&state.pool, domain.id).await?)).into_response())
}

pub(super) async fn put_txt(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<Vec<input::TxtSpec>>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    if body.len() > input::MAX_TXT {
        return Err(ApiError::invalid(format!("at most {} TXT records", input::MAX_TXT)));
    }
    let mut records = Vec::with_capacity(body.len());
    for (i, spec) in body.into_iter().enumerate() {
        let owner = match spec.name {
            Some(name) => input::record_owner(&format!("[{i}].name"), &name)?,
            None => domain.fqdn.clone(),
        };
        if owner != domain.fqdn && !owner.ends_with(&format!(".{}", domain.fqdn)) {
            return Err(ApiError::forbidden(format!(
                "[{i}].name: {} is not {} or a name under it",
                display(&owner),
                display(&domain.fqdn)
            )));
        }
        let value = input::txt_value(&format!("[{i}].value"), &spec.value)?;
        let ttl = input::bounded(&format!("[{i}].ttl"), spec.ttl, 0, 86_400)?;
        records.push(admin::Txt { name: owner, value, ttl });
    }
    admin::replace_txt(&state.pool, domain.id, &records).await.map_err(stored_conflict)?;
    tracing::info!(domain = %domain.fqdn, records = records.len(), "TXT records replaced");
    Ok(Json(txt_out(admin::txt_records(&state.pool, domain.id).await?)).into_response())
}

fn txt_out(records: Vec<admin::Txt>) -> Vec<Value> {
    records.into_iter().map(|r| json!({ "name": display(&r.name), "value": r.value, "ttl": r.ttl })).collect()
}

pub(super) async fn create_update_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    // The key's name says whose it is; the random part keeps names unguessable and unique.
    let key_name = format!("{}.key.{}", &new_token("u")[2..14], domain.fqdn);
    let mut secret = [0_u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut secret);
    let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret);
    let algorithm = "hmac-sha256";
    let created_at = admin::create_update_key(&state.pool, domain.id, &key_name, algorithm, &secret)
        .await
        .map_err(stored_conflict)?;
    tracing::info!(domain = %domain.fqdn, key = %key_name, "UPDATE key issued");
    Ok(created(json!({
        "name": key_name,
        "algorithm": algorithm,
        "secret": secret,
        "created_at": created_at,
    })))
}

pub(super) async fn list_update_keys(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    Ok(Json(admin::update_keys(&state.pool, domain.id).await?).into_response())
}

pub(super) async fn delete_update_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let key = format!("{}.", key.trim_end_matches('.').to_ascii_lowercase());
    if !admin::delete_update_key(&state.pool, domain.id, &key).await? {
        return Err(ApiError::not_found(format!("no UPDATE key {} for {}", display(&key), display(&domain.fqdn))));
    }
    tracing::info!(domain = %domain.fqdn, %key, "UPDATE key revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn delete_ncu(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let not_found = || ApiError::not_found(format!("no NCU {id} enrolled for {}", display(&domain.fqdn)));
    let id: i64 = id.parse().map_err(|_| not_found())?;
    if !admin::delete_ncu(&state.pool, domain.id, id).await? {
        return Err(not_found());
    }
    tracing::info!(domain = %domain.fqdn, ncu = id, "NCU deleted: its certificate is refused from now on");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn create_dyndns_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let username = new_token("dd").chars().take(19).collect::<String>();
    let password = new_token("ddp");
    let created_at = admin::create_dyndns_credential(&state.pool, domain.id, &username, &token_hash(&password))
        .await
        .map_err(stored_conflict)?;
    tracing::info!(domain = %domain.fqdn, %username, "dyndns credential issued");
    Ok(created(json!({
        "username": username,
        "password": password,
        "hostname": display(&domain.fqdn),
        "created_at": created_at,
    })))
}

pub(super) async fn list_dyndns_credentials(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    Ok(Json(admin::dyndns_credentials(&state.pool, domain.id).await?).into_response())
}

pub(super) async fn delete_dyndns_credential(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, username)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    if !admin::delete_dyndns_credential(&state.pool, domain.id, &username).await? {
        return Err(ApiError::not_found(format!("no credential {username:?} for {}", display(&domain.fqdn))));
    }
    tracing::info!(domain = %domain.fqdn, %username, "dyndns credential revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn list_heartbeat_servers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    Ok(Json(admin::heartbeat_servers(&state.pool).await?).into_response())
}

pub(super) async fn drain_heartbeat_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_heartbeat_server_state(state, caller, name, "draining").await
}

pub(super) async fn activate_heartbeat_server(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_heartbeat_server_state(state, caller, name, "active").await
}

async fn set_heartbeat_server_state(
    state: AppState,
    caller: Caller,
    name: String,
    to: &str,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    match admin::set_heartbeat_server_state(&state.pool, &name, to).await? {
        Some(server) => {
            tracing::info!(server = %server.name, state = to, "heartbeat server state set");
            Ok(Json(server).into_response())
        }
        None => Err(ApiError::not_found(format!("no heartbeat server {name:?}"))),
    }
}

/// The named domain, if it exists and the caller may touch it.
pub(super) async fn owned_domain(state: &AppState, caller: Caller, name: &str) -> Result<admin::Domain, ApiError> {
    let fqdn = path_name(name)?;
    let Some(domain) = admin::domain_by_name(&state.pool, &fqdn).await? else {
        return Err(ApiError::not_found(format!("no domain {}", display(&fqdn))));
    };
    caller.require_owner(domain.subscriber_id)?;
    Ok(domain)
}

/// A domain name from the path, normalised; one that is not a name is a 400 `bad_path`, as for any other path.
fn path_name(name: &str) -> Result<String, ApiError> {
    input::hostname("name", name).map_err(|e| {
        if e.status() == StatusCode::UNPROCESSABLE_ENTITY {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_path", format!("{name:?} is not a valid domain name"))
        } else {
            e
        }
    })
}

/// Refuses a new domain whose name or static address belongs to someone else: the zone's apex and nameserver names
/// (the operator's), a name under or above another subscriber's domain, a name the SRV answers generate under a
/// domain (`ip-…`), another domain's static address.
async fn owns_the_name(
    state: &AppState,
    caller: Caller,
    zone_id: i64,
    fqdn: &str,
    subscriber_id: i64,
    static_ip: Option<IpAddr>,
) -> Result<(), ApiError> {
    let n = admin::neighbours(&state.pool, zone_id, fqdn, subscriber_id, static_ip).await?;
    let refuse = |status: StatusCode, why: String| {
        tracing::warn!(domain = %display(fqdn), subscriber_id, %why, "domain refused");
        Err(ApiError::new(status, if status == StatusCode::FORBIDDEN { "forbidden" } else { "conflict" }, why))
    };
    if n.origin == fqdn && caller != Caller::Operator {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("name: {} is the zone's apex, which is the operator's", display(fqdn)),
        );
    }
    if n.nameserver {
        return refuse(StatusCode::CONFLICT, format!("name: {} is a nameserver of the zone", display(fqdn)));
    }
    if let Some(above) = &n.above {
        if n.above_owner.is_some_and(|owner| owner != subscriber_id) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("name: under {}, another subscriber's domain", display(above)),
            );
        }
        let first = fqdn.split('.').next().unwrap_or_default();
        if first.starts_with("ip-")
            && fqdn.strip_prefix(first).and_then(|r| r.strip_prefix('.')) == Some(above.as_str())
        {
            return refuse(
                StatusCode::CONFLICT,
                format!("name: {} is reserved for the SRV targets generated under {}", display(fqdn), display(above)),
            );
        }
    }
    if let Some(below) = &n.foreign_below {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("name: {} below it is another subscriber's domain", display(below)),
        );
    }
    if let (Some(_), Some(ip)) = (&n.static_taken_by, static_ip) {
        return refuse(StatusCode::CONFLICT, format!("static_ip: {ip} is already another domain's static address"));
    }
    Ok(())
}

/// A store conflict as a 409 with the store's own message (a bound reached, a name taken).
fn stored_conflict(error: store::StoreError) -> ApiError {
    match error {
        store::StoreError::Conflict(message) => ApiError::conflict(message),
        other => other.into(),
    }
}

/// A store conflict with a message naming what collided.
fn conflict_as(error: store::StoreError, message: String) -> ApiError {
    match error {
        store::StoreError::Conflict(ref what) if what.starts_with("duplicate") => ApiError::conflict(message),
        other => other.into(),
    }
}

fn zone_out(zone: admin::Zone) -> Value {
    let nameservers: Vec<Value> =
        zone.nameservers.0.iter().map(|ns| json!({ "name": display(&ns.name), "ips": ns.ips })).collect();
    json!({
        "id": zone.id,
        "origin": display(&zone.origin),
        "nameservers": nameservers,
        "hostmaster": display(&zone.hostmaster),
        "serial": zone.serial,
        "refresh": zone.refresh,
        "retry": zone.retry,
        "expire": zone.expire,
        "minimum": zone.minimum,
        "soa_ttl": zone.soa_ttl,
        "ns_ttl": zone.ns_ttl,
    })
}

fn domain_out(
    d: admin::Domain,
    addresses: Option<Vec<admin::AddressRow>>,
    services: Option<Vec<admin::Service>>,
) -> DomainOut {
    DomainOut {
        name: display(&d.fqdn).to_owned(),
        zone: display(&d.zone).to_owned(),
        subscriber_id: d.subscriber_id,
        static_ip: d.static_ip,
        ttl: d.ttl,
        fallback_ip: d.fallback_ip,
        when_empty: d.when_empty,
        load_threshold_pct: d.load_threshold_pct,
        created_at: d.created_at,
        addresses,
        ncus: None,
        services: services.map(services_out),
    }
}

/// Service tuples as the API shows them: targets without the trailing dot, like every name.
fn services_out(list: Vec<admin::Service>) -> Vec<admin::Service> {
    list.into_iter().map(|s| admin::Service { target: s.target.map(|t| display(&t).to_owned()), ..s }).collect()
}
