//! ncu: tether's network connection unit, running on the site's router.
//!
//! Today: enrollment with hds (key and CSR made here, certificate stored 0600) and asking hds for heartbeat servers.

pub mod hds_client;
pub mod identity;
