//! `hds pki`, run as the real binary.

use std::{os::unix::fs::PermissionsExt, process::Command};

fn hds() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hds"))
}

#[test]
fn init_creates_a_ca_and_server_certificates_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let out = hds()
        .args(["pki", "init", "--dir"])
        .arg(&pki)
        .args(["--server", "hds-1=127.0.0.1,hds-1.example.net", "--server", "hbs-a=198.18.0.2"])
        .output()
        .expect("run hds");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (file, mode) in [("ca.pem", 0o644), ("ca.key", 0o600), ("hds-1.key", 0o600), ("hbs-a.pem", 0o644)] {
        let meta = std::fs::metadata(pki.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let cert = std::fs::read_to_string(pki.join("hbs-a.pem")).expect("cert");
    let der = tether_pki::cert_from_pem(&cert).expect("pem");
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    let sans = format!("{:?}", parsed.subject_alternative_name().expect("ext").expect("san").value.general_names);
    assert!(sans.contains("198.18.0.2") || sans.contains("[198, 18, 0, 2]"), "{sans}");

    let again = hds().args(["pki", "init", "--dir"]).arg(&pki).output().expect("run hds");
    assert!(!again.status.success());
    let message = String::from_utf8_lossy(&again.stderr);
    assert!(message.contains("refusing to overwrite"), "{message}");

    let more = hds().args(["pki", "issue", "--dir"]).arg(&pki).args(["--server", "hbs-b=::1"]).output().expect("run");
    assert!(more.status.success(), "{}", String::from_utf8_lossy(&more.stderr));
    assert!(pki.join("hbs-b.pem").exists());

    let bad = hds().args(["pki", "issue", "--dir"]).arg(&pki).args(["--server", "no-sans"]).output().expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("NAME=SAN"));
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hds.toml");
    std::fs::write(&path, "ca = 'a'\ncert = 'b'\nkey = 'c'\nlisten = 'nowhere'\n").expect("write");
    let out = hds().arg("--config").arg(&path).output().expect("run hds");
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("listen"), "{message}");
}
