//! ncu: tether's network connection unit, running on the site's router.
//!
//! Enrollment with hds ([`hds_client`], identity on disk in [`identity`]), and `ncu run` ([`agent`]): registering the
//! uplinks with the assigned heartbeat server, answering heartbeats on every uplink, failing over to the backup.

pub mod agent;
pub mod config;
pub mod hds_client;
pub mod identity;
pub mod load;
pub mod redirect;
pub mod renewal;
pub mod services;
pub mod session;
pub mod uplinks;
