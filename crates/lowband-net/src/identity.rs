//! Node identities: an ed25519 key pair per node; the public key is the node's name in a cluster.
//!
//! Key file (text, written atomically with mode 0600):
//! ```text
//! # lowband node key (ed25519). Keep this file secret; share the public line.
//! public <64 hex digits>
//! secret <PKCS#8 v2 DER of the key pair, hex>
//! ```

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::NetError;

/// An ed25519 public key: who a node is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

/// Bytes of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
/// Largest key file read (a key file is about 250 bytes).
const KEY_FILE_BYTES_MAX: u64 = 4096;

impl PublicKey {
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", &hex(&self.0)[..16])
    }
}

impl FromStr for PublicKey {
    type Err = NetError;
    fn from_str(text: &str) -> Result<Self, NetError> {
        let bytes = unhex(text.trim())
            .ok_or_else(|| NetError::BadKey(format!("`{}` is not hex", text.trim())))?;
        let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            NetError::BadKey(format!("a public key has 32 bytes, this one {}", b.len()))
        })?;
        Ok(PublicKey(key))
    }
}

/// A node's key pair.
pub struct Identity {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl Identity {
    pub fn generate() -> Result<Self, NetError> {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| NetError::BadKey("the system random source failed".into()))?;
        Self::from_pkcs8(document.as_ref().to_vec())
    }

    pub fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, NetError> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| NetError::BadKey(format!("not an ed25519 PKCS#8 key: {e}")))?;
        Ok(Identity { pkcs8, pair })
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(
            self.pair
                .public_key()
                .as_ref()
                .try_into()
                .expect("ed25519 public keys have 32 bytes"),
        )
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        self.pair
            .sign(message)
            .as_ref()
            .try_into()
            .expect("ed25519 signatures have 64 bytes")
    }

    pub(crate) fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Write the key file atomically (temporary file, fsync, rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), NetError> {
        let io = |e: std::io::Error| NetError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        if path.is_dir() {
            return Err(NetError::BadKey(format!(
                "{} is a directory: a key is written to a file",
                path.display()
            )));
        }
        let text = format!("# lowband node key (ed25519). Keep this file secret; share the public line.\npublic {}\nsecret {}\n", self.public_key(), hex(&self.pkcs8));
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let temporary = dir.join(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("key")
        ));
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&temporary, path)
        })();
        if written.is_err() {
            // Never leave the secret behind in a temporary file.
            let _ = std::fs::remove_file(&temporary);
        }
        written.map_err(io)
    }

    /// Read a key file; the public line must match the secret key.
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let io = |e: std::io::Error| NetError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > KEY_FILE_BYTES_MAX {
            return Err(NetError::BadKey(format!(
                "{}: {size} bytes is not a key file",
                path.display()
            )));
        }
        // Read at most one byte past the limit: a device (`/dev/zero`) reports no size.
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(
                std::fs::File::open(path).map_err(io)?,
                KEY_FILE_BYTES_MAX + 1,
            ),
            &mut text,
        )
        .map_err(io)?;
        if text.len() as u64 > KEY_FILE_BYTES_MAX {
            return Err(NetError::BadKey(format!(
                "{}: more than {KEY_FILE_BYTES_MAX} bytes is not a key file",
                path.display()
            )));
        }
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
                .ok_or_else(|| {
                    NetError::BadKey(format!("{}: no `{}` line", path.display(), name.trim()))
                })
        };
        let public: PublicKey = field("public ")?.parse()?;
        let secret = unhex(field("secret ")?).ok_or_else(|| {
            NetError::BadKey(format!("{}: the secret is not hex", path.display()))
        })?;
        let identity = Identity::from_pkcs8(secret)?;
        if identity.public_key() != public {
            return Err(NetError::BadKey(format!(
                "{}: the public line does not belong to the secret key",
                path.display()
            )));
        }
        Ok(identity)
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_file_and_sign() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let identity = Identity::generate().unwrap();
        identity.save(&path).unwrap();
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_key(), identity.public_key());
        let signature = loaded.sign(b"round 7");
        assert!(identity.public_key().verify(b"round 7", &signature));
        assert!(!identity.public_key().verify(b"round 8", &signature));
        assert_eq!(
            identity
                .public_key()
                .to_string()
                .parse::<PublicKey>()
                .unwrap(),
            identity.public_key()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn bad_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let other = Identity::generate().unwrap();
        let cases = [
            ("missing", None, "No such file"),
            ("empty", Some(String::new()), "no `public` line"),
            (
                "short",
                Some("public abcd\nsecret 00\n".to_string()),
                "32 bytes",
            ),
            (
                "mismatch",
                Some(format!(
                    "public {}\nsecret {}\n",
                    other.public_key(),
                    hex(Identity::generate().unwrap().pkcs8())
                )),
                "does not belong",
            ),
            (
                "nothex",
                Some(format!("public {}\nsecret zz\n", other.public_key())),
                "not hex",
            ),
            ("huge", Some("x".repeat(10_000)), "not a key file"),
        ];
        for (name, content, needle) in cases {
            let path = dir.path().join(name);
            if let Some(c) = content {
                std::fs::write(&path, c).unwrap();
            }
            let error = Identity::load(&path)
                .err()
                .unwrap_or_else(|| panic!("{name} loaded"))
                .to_string();
            assert!(error.contains(needle), "{name}: {error}");
        }
    }
}
