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
    /// Loads an identity written by `ncu enroll` (finishing a renewal a crash interrupted).
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        finish_replace(dir)?;
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

    /// Replaces the key and certificate in `dir` with renewed ones. Both new files are written and synced first,
    /// then renamed over the old ones (key, then certificate); a crash in between is finished by the next
    /// [`Identity::load`], so the key and certificate on disk always belong together.
    pub fn replace(&self, dir: &Path) -> Result<(), PkiError> {
        for (name, contents) in [(KEY, &self.key_pem), (CERT, &self.cert_pem)] {
            let staged = dir.join(format!("{name}{NEW}"));
            // A leftover of an attempt that failed before its renames.
            let _ = std::fs::remove_file(&staged);
            pki::write_new(&staged, contents, 0o600)?;
        }
        finish_replace(dir)
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

/// Suffix of a renewed file not yet in place.
const NEW: &str = ".new";

/// Renames staged renewed files into place, key first, and syncs the directory. With only the certificate staged,
/// the key was renamed already: the certificate follows it.
fn finish_replace(dir: &Path) -> Result<(), PkiError> {
    let (key, cert) = (dir.join(format!("{KEY}{NEW}")), dir.join(format!("{CERT}{NEW}")));
    if !cert.exists() {
        // Without the staged certificate, a staged key is from a write that never completed: the old pair holds.
        let _ = std::fs::remove_file(&key);
        return Ok(());
    }
    for (from, to) in [(key, dir.join(KEY)), (cert, dir.join(CERT))] {
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|source| PkiError::Io { path: from.clone(), source })?;
        }
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| PkiError::Io { path: dir.to_owned(), source })
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io { path: dir.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(tag: &str) -> Identity {
        Identity { ca_pem: "ca".into(), key_pem: format!("key {tag}"), cert_pem: format!("cert {tag}") }
    }

    #[test]
    fn a_renewal_replaces_the_pair_and_a_crash_between_renames_is_finished_on_load() -> Result<(), PkiError> {
        let dir = tempfile::tempdir().map_err(|source| PkiError::Io { path: "tmp".into(), source })?;
        let dir = dir.path().join("id");
        identity("old").save(&dir)?;
        identity("new").replace(&dir)?;
        let loaded = Identity::load(&dir)?;
        assert_eq!((loaded.key_pem.as_str(), loaded.cert_pem.as_str()), ("key new", "cert new"));

        // A crash after the key's rename: the certificate is staged still; loading finishes the renewal.
        pki::write_new(&dir.join(format!("{CERT}{NEW}")), "cert newer", 0o600)?;
        std::fs::write(dir.join(KEY), "key newer").map_err(|source| PkiError::Io { path: dir.clone(), source })?;
        let loaded = Identity::load(&dir)?;
        assert_eq!((loaded.key_pem.as_str(), loaded.cert_pem.as_str()), ("key newer", "cert newer"));

        // A crash while staging (the key only): the old pair holds and the stray key goes.
        pki::write_new(&dir.join(format!("{KEY}{NEW}")), "key half", 0o600)?;
        let loaded = Identity::load(&dir)?;
        assert_eq!((loaded.key_pem.as_str(), loaded.cert_pem.as_str()), ("key newer", "cert newer"));
        assert!(!dir.join(format!("{KEY}{NEW}")).exists());
        Ok(())
    }
}
