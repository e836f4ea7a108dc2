use aes_gcm::aead::{Aead, Generate, Key, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

/// Why a value could not be sealed, unsealed or a key loaded.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key is not 32 bytes of base64.
    #[error("the sealing key must be 32 bytes, base64-encoded ({0})")]
    BadKey(String),
    /// The key file could not be read.
    #[error("cannot read the sealing key file {path}: {source}")]
    KeyFile {
        /// The file's path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stored value is not something this module sealed.
    #[error("the stored value is not a sealed value")]
    Malformed,
    /// The value was sealed under another key, or altered.
    #[error("the stored value cannot be unsealed: it was sealed with another key or altered")]
    WrongKeyOrTampered,
}

/// The 256-bit key that seals secrets at rest; never stored in the database.
#[derive(Clone)]
pub struct SealingKey(Key<Aes256Gcm>);

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(Key::<Aes256Gcm>::generate())
    }

    /// Parses a base64-encoded 32-byte key.
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| SealError::BadKey(e.to_string()))?;
        let key = Key::<Aes256Gcm>::try_from(bytes.as_slice())
            .map_err(|_| SealError::BadKey(format!("got {} bytes", bytes.len())))?;
        Ok(Self(key))
    }

    /// Reads a base64-encoded key from a file.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let text = std::fs::read_to_string(path).map_err(|source| SealError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_base64(&text)
    }

    /// The key in base64, to write to a key file.
    pub fn to_base64(&self) -> SecretString {
        SecretString::from(STANDARD.encode(self.0.as_slice()))
    }
}

/// Seals and unseals secrets with AES-256-GCM; `context` binds a value to where it is stored.
#[derive(Clone)]
pub struct Sealer {
    cipher: Arc<Aes256Gcm>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// A sealer using `key`.
    pub fn new(key: &SealingKey) -> Self {
        Self {
            cipher: Arc::new(Aes256Gcm::new(&key.0)),
        }
    }

    /// Seals `plaintext` for storage under `context` (e.g. `settings/microsoft_outlook/client_secret`).
    pub fn seal(&self, plaintext: &str, context: &str) -> String {
        let nonce = Nonce::generate();
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            // AES-GCM encryption only fails for messages over 64 GiB.
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{}", STANDARD.encode(out))
    }

    /// Unseals a value stored by [`Sealer::seal`] under the same `context`.
    pub fn unseal(&self, stored: &str, context: &str) -> Result<SecretString, SealError> {
        let body = stored.strip_prefix(PREFIX).ok_or(SealError::Malformed)?;
        let bytes = STANDARD.decode(body).map_err(|_| SealError::Malformed)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| SealError::Malformed)?;
        let plain = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::WrongKeyOrTampered)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| SealError::Malformed)
    }

    /// Seals a secret string (convenience for [`SecretString`] holders).
    pub fn seal_secret(&self, secret: &SecretString, context: &str) -> String {
        self.seal(secret.expose_secret(), context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let key = SealingKey::generate();
        let sealer = Sealer::new(&key);
        let sealed = sealer.seal("s3cret", "ctx");
        assert!(!sealed.contains("s3cret"));
        assert_eq!(
            sealer
                .unseal(&sealed, "ctx")
                .map(|s| s.expose_secret().to_string())
                .ok(),
            Some("s3cret".to_string())
        );
        assert!(matches!(
            sealer.unseal(&sealed, "other"),
            Err(SealError::WrongKeyOrTampered)
        ));
        let other = Sealer::new(&SealingKey::generate());
        assert!(matches!(
            other.unseal(&sealed, "ctx"),
            Err(SealError::WrongKeyOrTampered)
        ));
        let again =
            SealingKey::from_base64(key.to_base64().expose_secret()).map(|k| Sealer::new(&k));
        assert!(again.is_ok_and(|s| s.unseal(&sealed, "ctx").is_ok()));
        assert!(matches!(
            SealingKey::from_base64("c2hvcnQ="),
            Err(SealError::BadKey(_))
        ));
    }
}
