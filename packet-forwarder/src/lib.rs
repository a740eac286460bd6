//! packet-forwarder: each static address relayed to the live dynamic addresses.
