//! hbs: tether's heartbeat server, and the NCU ↔ HBS protocol it owns.

pub mod heartbeat;
