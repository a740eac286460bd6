//! Who may transfer a zone and whom dns tells of its changes: secondaries by address prefix and TSIG key, NOTIFY
//! targets, and the keys (RFC 8945) they name. Stored per zone as JSON (`zones.transfer`); keys may also come from
//! the configuration file.

use std::{fmt, net::SocketAddr};

use base64::Engine as _;
use hickory_proto::rr::{Name, TSigner, rdata::tsig::TsigAlgorithm};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Most secondaries, NOTIFY targets or keys in one zone's policy.
pub const MAX_ENTRIES: usize = 64;
/// Shortest TSIG secret accepted, in bytes (RFC 8945 section 6: at least the hash's output is advised; 16 bytes is
/// the floor for HMAC-SHA256 keys that BIND and Knot generate with fewer bits).
pub const MIN_SECRET: usize = 16;
/// Allowed clock skew of a TSIG-signed message, seconds (RFC 8945 recommends 300).
pub const FUDGE: u16 = 300;

/// A zone's transfer policy. Empty: no transfers, no NOTIFY.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferPolicy {
    /// Who may transfer the zone (AXFR, IXFR).
    #[serde(default)]
    pub secondaries: Vec<Secondary>,
    /// Where NOTIFY goes on every serial change.
    #[serde(default)]
    pub notify: Vec<NotifyTarget>,
    /// The keys secondaries and targets name; a name not here is looked up in the configuration file's keys.
    #[serde(default)]
    pub keys: Vec<TsigKey>,
}

/// A secondary allowed to transfer: its address prefix and, when set, the key its requests must be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secondary {
    /// Source addresses allowed.
    pub prefix: IpNet,
    /// Key name; requests from the prefix must carry a valid signature by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Where NOTIFY goes, signed with `key` when set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyTarget {
    /// Address and port of the secondary.
    pub addr: SocketAddr,
    /// Key name to sign with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A TSIG key: its name, algorithm and secret (base64, as `tsig-keygen` and `keymgr` print it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsigKey {
    /// Key name, a domain name (`transfer-key.` or `transfer-key`).
    pub name: String,
    /// `hmac-sha256` (default), `hmac-sha384` or `hmac-sha512`.
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// The shared secret, base64.
    pub secret: String,
}

fn default_algorithm() -> String {
    "hmac-sha256".to_owned()
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey").field("name", &self.name).field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

/// Why a policy or key is refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The offending field, e.g. `keys[0].secret`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError { field: field.into(), message: message.into() }
}

impl TransferPolicy {
    /// Checks bounds, key names, algorithms and secrets; `known` tells whether a key name not in this policy is
    /// defined elsewhere (the configuration file).
    pub fn validate(&self, known: &dyn Fn(&Name) -> bool) -> Result<(), PolicyError> {
        for (field, len) in
            [("secondaries", self.secondaries.len()), ("notify", self.notify.len()), ("keys", self.keys.len())]
        {
            if len > MAX_ENTRIES {
                return Err(error(field, format!("at most {MAX_ENTRIES} entries")));
            }
        }
        let mut names = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            let signer = key.signer().map_err(|e| PolicyError { field: format!("keys[{i}].{}", e.field), ..e })?;
            if names.contains(signer.signer_name()) {
                return Err(error(format!("keys[{i}].name"), "defined twice"));
            }
            names.push(signer.signer_name().clone());
        }
        let check_ref = |field: String, key: &Option<String>| -> Result<(), PolicyError> {
            let Some(key) = key else { return Ok(()) };
            let name = key_name(key).map_err(|m| error(field.clone(), m))?;
            if names.contains(&name) || known(&name) {
                Ok(())
            } else {
                Err(error(field, format!("no key named {name} (in keys or in the configuration file)")))
            }
        };
        for (i, secondary) in self.secondaries.iter().enumerate() {
            check_ref(format!("secondaries[{i}].key"), &secondary.key)?;
        }
        for (i, target) in self.notify.iter().enumerate() {
            if target.addr.port() == 0 || target.addr.ip().is_unspecified() || target.addr.ip().is_multicast() {
                return Err(error(format!("notify[{i}].addr"), "must be a unicast address and a port"));
            }
            check_ref(format!("notify[{i}].key"), &target.key)?;
        }
        Ok(())
    }

    /// The same policy with every secret replaced by `"***"`, for API answers.
    pub fn masked(&self) -> Self {
        let mut masked = self.clone();
        for key in &mut masked.keys {
            "***".clone_into(&mut key.secret);
        }
        masked
    }

    /// Whether anything is configured: transfers are served or NOTIFY sent.
    pub fn is_empty(&self) -> bool {
        self.secondaries.is_empty() && self.notify.is_empty()
    }

    /// This policy's key named `name`, as a signer.
    pub fn signer(&self, name: &Name) -> Option<TSigner> {
        self.keys.iter().filter_map(|k| k.signer().ok()).find(|s| s.signer_name() == name)
    }
}

impl TsigKey {
    /// The key as hickory's signer; errors name the field (`name`, `algorithm`, `secret`).
    pub fn signer(&self) -> Result<TSigner, PolicyError> {
        let name = key_name(&self.name).map_err(|m| error("name", m))?;
        let algorithm = match self.algorithm.to_ascii_lowercase().as_str() {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => {
                return Err(error("algorithm", format!("'{other}' is not hmac-sha256, hmac-sha384 or hmac-sha512")));
            }
        };
        let secret = base64::engine::general_purpose::STANDARD
            .decode(self.secret.trim())
            .map_err(|_| error("secret", "is not base64"))?;
        if secret.len() < MIN_SECRET {
            return Err(error("secret", format!("must decode to at least {MIN_SECRET} bytes")));
        }
        TSigner::new(secret, algorithm, name, FUDGE).map_err(|e| error("algorithm", e.to_string()))
    }
}

/// A key name as a fully qualified, lower-case domain name.
pub fn key_name(text: &str) -> Result<Name, String> {
    if text.is_empty() || text.len() > 253 {
        return Err("must be a domain name of 1 to 253 characters".to_owned());
    }
    let mut name = Name::from_ascii(text).map_err(|e| format!("is not a domain name: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtMzItYnl0ZXMhIQ==";

    fn policy() -> TransferPolicy {
        serde_json::from_value(serde_json::json!({
            "secondaries": [{ "prefix": "127.0.0.1/32" }, { "prefix": "198.18.0.0/24", "key": "k1" }],
            "notify": [{ "addr": "127.0.0.1:5300", "key": "K1." }],
            "keys": [{ "name": "k1", "secret": SECRET }],
        }))
        .expect("parses")
    }

    #[test]
    fn a_policy_validates_and_resolves_its_keys() {
        let policy = policy();
        policy.validate(&|_| false).expect("valid");
        let name = key_name("K1").expect("name");
        assert_eq!(name.to_ascii(), "k1.");
        assert!(policy.signer(&name).is_some());
        assert_eq!(policy.masked().keys[0].secret, "***");
        assert!(!format!("{:?}", policy.keys[0]).contains(SECRET), "Debug hides the secret");
    }

    #[test]
    fn bad_policies_name_the_field() {
        let mut p = policy();
        p.secondaries[1].key = Some("other".into());
        assert_eq!(p.validate(&|_| false).expect_err("unknown key").field, "secondaries[1].key");
        assert!(p.validate(&|n| n.to_ascii() == "other.").is_ok(), "a configuration-file key");
        let mut p = policy();
        p.keys[0].secret = "c2hvcnQ=".into();
        assert_eq!(p.validate(&|_| false).expect_err("short").field, "keys[0].secret");
        let mut p = policy();
        p.keys[0].algorithm = "hmac-md5".into();
        assert_eq!(p.validate(&|_| false).expect_err("md5").field, "keys[0].algorithm");
        let mut p = policy();
        p.notify[0].addr = "0.0.0.0:53".parse().expect("addr");
        assert_eq!(p.validate(&|_| false).expect_err("unspecified").field, "notify[0].addr");
        let mut p = policy();
        p.keys.push(p.keys[0].clone());
        assert_eq!(p.validate(&|_| false).expect_err("twice").field, "keys[1].name");
        let mut p = policy();
        p.secondaries = vec![p.secondaries[0].clone(); MAX_ENTRIES + 1];
        assert_eq!(p.validate(&|_| false).expect_err("too many").field, "secondaries");
        assert!(serde_json::from_value::<TransferPolicy>(serde_json::json!({ "allow": [] })).is_err());
    }
}
