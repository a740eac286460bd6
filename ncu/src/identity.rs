//! The NCU's identity on disk: the operator CA, its private key and its client certificate, all 0600.

use std::path::{Path, PathBuf};

use tether_pki::{self as pki, PkiError};

/// File names inside the identity directory.
const CA: &str = "ca.pem";
const KEY: &str = "ncu.key";
const CERT: &str = "ncu.pem";

/// What an enrolled NCU presents.
#[derive(Clone)]
pub struct Identity {
    /// The operator CA, PEM: the only root the NCU trusts.
    pub ca_pem: String,
    /// The NCU's private key, PEM.
    pub key_pem: String,
    /// The NCU's client certificate, PEM.
    pub cert_pem: String,
}

impl Identity {
    /// Loads an identity written by `ncu enroll`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        Ok(Self {
            ca_pem: pki::read(&dir.join(CA))?,
            key_pem: pki::read(&dir.join(KEY))?,
            cert_pem: pki::read(&dir.join(CERT))?,
        })
    }

    /// Writes the identity into `dir` (created 0700), every file 0600, refusing to overwrite one.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        create_private_dir(dir)?;
        for (name, contents) in [(KEY, &self.key_pem), (CERT, &self.cert_pem), (CA, &self.ca_pem)] {
            pki::write_new(&dir.join(name), contents, 0o600)?;
        }
        // The files' names are on disk too once the directory is synced.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| PkiError::Io { path: dir.to_owned(), source })
    }

    /// True when `dir` already holds an identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(CERT).exists() || dir.join(KEY).exists()
    }

    /// Paths of the files, for messages.
    pub fn files(dir: &Path) -> [PathBuf; 3] {
        [dir.join(CA), dir.join(KEY), dir.join(CERT)]
    }
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io { path: dir.to_owned(), source })
}
