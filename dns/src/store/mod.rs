//! dns's SQL: the reads that build the view ([`view`]) and the admin API's reads and writes ([`admin`]). The pool,
//! migrations and error classes are [`tether_db`]'s.

pub mod admin;
pub mod events;
pub mod migration;
pub mod view;

pub use tether_db::StoreError;
