//! tether's wire protocols, with no I/O: length-prefixed JSON [`frame`]s, the NCU/HBS ↔ HDS messages ([`hds`]), the
//! NCU ↔ HBS control messages ([`control`]), and heartbeats ([`heartbeat`]): the packet and the sans-IO state machines
//! of both sides. No tokio, no sockets, no database: the servers and ncu drive these.

pub mod control;
pub mod frame;
pub mod hds;
pub mod heartbeat;
