//! packet-forwarder: real Postgres, dns's admin API, the forwarder in-process (and as a binary), site servers and
//! clients on private 127.0.N.x ranges, one N per test.

mod api;
mod binary;
pub(crate) mod common;
mod limits;
mod liveness;
mod relay;
