//! hds requests from arbitrary bytes: `hds::decode` (a whole frame, as hds reads a stream) and `frame::decode_body`
//! into `Request` (and `Response`, which an NCU decodes), then what hds does with a request before its database:
//! the CSR of an enrollment or renewal signed by the operator CA (`Ca::sign_ncu`), an assignment chosen with the
//! NCU's list of failed servers (`hds::assign::choose`); a refusal's error code. The same bytes also go to the CSR
//! parser as a PEM request, so that it sees DER rather than only JSON strings. Nothing may panic; a signed
//! certificate reads back; a chosen server is a healthy one, not one the NCU reported failed while another is
//! healthy, and the backup differs from the primary.

#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine as _;
use hds::assign::{self, FleetState, Server};
use libfuzzer_sys::fuzz_target;
use tether_pki::Ca;
use tether_proto::{
    frame,
    hds::{self as proto, Request, Response},
};

/// How long a fleet row stays fresh.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// The fingerprint of the asking NCU's certificate.
const NCU: [u8; 32] = [0x5a; 32];

static CA: LazyLock<Ca> =
    LazyLock::new(|| Ca::generate("tether fuzz CA", Duration::from_secs(86_400)).expect("a CA is generated"));

/// A fleet with a server in every state: healthy ones on two hosts, full, draining, stale, without capacity, at it.
static FLEET: LazyLock<Vec<Server>> = LazyLock::new(|| {
    let server = |name: &str, address: &str, capacity, load, state, age| Server {
        name: name.into(),
        address: address.into(),
        capacity,
        load,
        state,
        age: Duration::from_secs(age),
    };
    vec![
        server("hbs-a", "198.51.100.1:4433", 100, 10, FleetState::Active, 1),
        server("hbs-b", "[2001:db8::2]:4433", 1000, 500, FleetState::Active, 5),
        server("hbs-c", "198.51.100.1:4434", 100, 12, FleetState::Active, 1),
        server("hbs-d", "198.51.100.4:4433", 100, 100, FleetState::Full, 1),
        server("hbs-e", "198.51.100.5:4433", 100, 0, FleetState::Draining, 1),
        server("hbs-f", "198.51.100.6:4433", 100, 0, FleetState::Active, 3_600),
        server("hbs-g", "198.51.100.7:4433", 0, 0, FleetState::Active, 1),
        server("hbs-h", "198.51.100.8:4433", 50, 50, FleetState::Active, 1),
    ]
});

fuzz_target!(|data: &[u8]| {
    for request in [proto::decode::<Request>(data), frame::decode_body(proto::VERSION, data)] {
        match request {
            Ok(request) => handle(&request),
            Err(error) => {
                let answer = Response::error(proto::error_code(&error), error.to_string());
                assert!(matches!(answer, Response::Error { .. }));
            }
        }
    }
    for response in [proto::decode::<Response>(data), frame::decode_body(proto::VERSION, data)] {
        if let Ok(Response::Assignment { primary, backup }) = response {
            for server in std::iter::once(&primary).chain(backup.as_ref()) {
                let _ = proto::host_of(&server.address);
            }
        }
    }
    sign(&pem(data));
});

/// What hds does with a request, short of its database.
fn handle(request: &Request) {
    match request {
        Request::Enroll { csr, serial, mac, .. } => {
            // hds keeps at most 64 characters of each, for display.
            for text in [serial, mac].into_iter().flatten() {
                let kept: String = text.chars().take(64).collect();
                assert!(text.starts_with(&kept));
            }
            sign(csr);
        }
        Request::Renew { csr } => sign(csr),
        Request::Assign { failed } => choose(failed),
    }
}

/// Signs `csr` as hds signs an NCU's request; what is signed must read back as a certificate.
fn sign(csr: &str) {
    let Ok(pem) = CA.sign_ncu(csr, "fuzz.example.", Duration::from_secs(86_400)) else { return };
    let der = tether_pki::cert_from_pem(&pem).expect("a signed certificate reads back");
    let _ = tether_pki::fingerprint(&der);
}

fn choose(failed: &[String]) {
    let healthy =
        |s: &Server| s.state == FleetState::Active && s.age <= STALE_AFTER && s.capacity > 0 && s.load < s.capacity;
    let pair = assign::choose(&FLEET, failed, STALE_AFTER, &NCU).expect("the fleet has healthy servers");
    assert!(healthy(&pair.primary), "{:?}", pair.primary);
    let spared = FLEET.iter().any(|s| healthy(s) && !failed.contains(&s.name));
    assert!(!spared || !failed.contains(&pair.primary.name), "{} was reported failed", pair.primary.name);
    if let Some(backup) = &pair.backup {
        assert!(healthy(backup) && backup.name != pair.primary.name, "{backup:?}");
    }
    assert_eq!(assign::choose(&FLEET, failed, STALE_AFTER, &NCU).ok(), Some(pair), "the choice is a function");
}

/// `der` as a PEM certificate request.
fn pem(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}
