//! Heartbeats: the packet format and the sans-IO state machines of both sides.

#[cfg(test)]
mod adversary;
pub mod monitor;
pub mod packet;
pub mod responder;
#[cfg(test)]
mod sim;
mod wheel;

pub use monitor::{ByState, Event, Liveness, Monitor, Policy, Stats, TargetId, Transmit};
pub use packet::{Key, Kind, PACKET_LEN, Packet, PacketError};
pub use responder::{Outgoing, Responder, ResponderEvent, ResponderPolicy, ResponderStats};
