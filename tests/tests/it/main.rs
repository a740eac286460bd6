//! Integration tests: real Postgres, real sockets, the dns server in-process on port 0.

mod admin_api;
mod anycast;
mod dns_answers;
mod dns_differential;
mod dyndns;
mod forwarder;
mod hbs_metrics;
mod hds;
mod heartbeat;
mod layout;
mod migration;
mod ncu_binary;
mod schema;
mod site_services;
mod standby;
mod status_page;
mod sync;
mod system;
mod tenants;
mod update;
mod uplink_limit;
mod uplinks;
mod zone_transfer;
