//! NCU ↔ HBS control frames from arbitrary bytes: `frame::decode` (a whole frame, prefix included) and
//! `frame::decode_body` (a frame's JSON, as a long-lived stream reads it after the prefix) into `ToHbs` and `ToNcu`,
//! then the checks each side applies to what decoded (`control::validate`, `validate_one`, `validate_redirects`,
//! `validate_services`). Nothing may panic; what decodes encodes and decodes back to itself; what a check accepts
//! keeps the promises the check's documentation makes, and what it refuses breaks one.

#![no_main]

use std::collections::BTreeSet;
use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use tether_proto::{
    control::{self, MAX_FRAME, MAX_SERVICES, MAX_UPLINKS, Redirect, SiteService, ToHbs, ToNcu, Uplink, VERSION},
    frame::{self, FrameError},
};

fuzz_target!(|data: &[u8]| {
    for message in [frame::decode::<ToHbs>(VERSION, MAX_FRAME, data), frame::decode_body(VERSION, data)] {
        match message {
            Ok(message) => to_hbs(&message),
            Err(error) => refused(&error),
        }
    }
    for message in [frame::decode::<ToNcu>(VERSION, MAX_FRAME, data), frame::decode_body(VERSION, data)] {
        match message {
            Ok(message) => to_ncu(&message),
            Err(error) => refused(&error),
        }
    }
});

/// The HBS's checks of a registration.
fn to_hbs(message: &ToHbs) {
    round_trip(message);
    match message {
        ToHbs::Register { uplinks, .. } => uplink_set(uplinks),
        ToHbs::UplinkUp { uplink } => {
            uplink_set(std::slice::from_ref(uplink));
            assert_eq!(control::validate(std::slice::from_ref(uplink)).is_ok(), control::validate_one(uplink).is_ok());
        }
        ToHbs::UplinkDown { .. } | ToHbs::ServiceHealth { .. } | ToHbs::Redirected { .. } => {}
    }
}

/// The NCU's checks of what the HBS sends.
fn to_ncu(message: &ToNcu) {
    round_trip(message);
    match message {
        ToNcu::Redirect { redirects } => redirect_set(redirects),
        ToNcu::Services { services } => service_set(services),
        ToNcu::Registered { .. } | ToNcu::Superseded { .. } | ToNcu::Drain { .. } | ToNcu::Error { .. } => {}
    }
}

/// A refusal says what it refused for.
fn refused(error: &FrameError) {
    let _ = error.to_string();
    if let FrameError::TooLarge { size, limit } = error {
        assert!(size > limit, "{size} bytes refused within the limit {limit}");
    }
}

/// `validate` accepts exactly the sets of at most `MAX_UPLINKS` valid uplinks with unique names and indexes.
fn uplink_set(uplinks: &[Uplink]) {
    let accepted = control::validate(uplinks).is_ok();
    let names: BTreeSet<&str> = uplinks.iter().map(|u| u.name.as_str()).collect();
    let indexes: BTreeSet<u8> = uplinks.iter().map(|u| u.index).collect();
    let each = uplinks.iter().all(|u| control::validate_one(u).is_ok());
    let expected =
        uplinks.len() <= MAX_UPLINKS && each && names.len() == uplinks.len() && indexes.len() == uplinks.len();
    assert_eq!(accepted, expected, "{uplinks:?}");
    for uplink in uplinks.iter().filter(|u| control::validate_one(u).is_ok()) {
        let ip = uplink.address;
        assert!(!ip.is_unspecified() && !ip.is_multicast() && uplink.port != 0 && uplink.weight != 0, "{uplink:?}");
        assert!(usize::from(uplink.index) < MAX_UPLINKS && (1..=32).contains(&uplink.name.len()), "{uplink:?}");
    }
}

fn redirect_set(redirects: &[Redirect]) {
    if control::validate_redirects(redirects).is_err() {
        return;
    }
    assert!(redirects.len() <= MAX_UPLINKS);
    for r in redirects {
        assert!((1..=64).contains(&r.ports.len()) && !r.ports.contains(&0), "{r:?}");
        assert!(r.from.is_ipv4() == r.to.is_ipv4() && r.from != r.to, "{r:?}");
    }
}

fn service_set(services: &[SiteService]) {
    if control::validate_services(services).is_err() {
        return;
    }
    assert!(services.len() <= MAX_SERVICES);
    for s in services {
        assert!(["tcp", "udp", "tls", "sctp"].contains(&s.transport.as_str()) && s.port != 0, "{s:?}");
        let label = |c: char| c.is_ascii_alphanumeric() || c == '-';
        assert!((1..=62).contains(&s.service.len()) && s.service.chars().all(label), "{s:?}");
    }
}

/// What decoded is encoded as a frame and decodes back to itself (when the frame stays within the limit).
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(message: &T) {
    let bytes = frame::encode(VERSION, message);
    if bytes.len() - 4 <= MAX_FRAME {
        assert_eq!(frame::decode::<T>(VERSION, MAX_FRAME, &bytes).as_ref(), Ok(message));
    }
}
