//! Heartbeats: the packet format and the sans-IO state machines of both sides.
