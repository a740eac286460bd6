//! Integration tests: real Postgres, real sockets, the dns server in-process on port 0.

mod admin_api;
mod dns_answers;
mod hds;
mod heartbeat;
mod sync;
mod system;
mod uplinks;
