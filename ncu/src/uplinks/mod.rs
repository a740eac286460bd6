//! Uplinks from the kernel: rtnetlink events (links, addresses, routes, both families) and a periodic full re-read
//! as a safety net; every candidate is validated by connecting out through it before it is published, and a
//! vanished or changed one is withdrawn at once. Non-Internet uplinks are retried with backoff.

pub mod discovery;
pub mod netlink;
pub mod routes;
pub mod state;
pub mod validate;
