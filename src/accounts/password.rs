//! Account passwords: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane), hashed on
//! the blocking pool so a signup storm cannot stall the async workers.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};

use crate::error::ApiError;
use crate::telemetry::spawn_blocking_with_span;

pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 128;

/// A password that met the length rules. Only ever held as a secret.
pub struct Password(SecretString);

impl Password {
    pub fn parse(raw: SecretString) -> Result<Password, ApiError> {
        let n = raw.expose_secret().chars().count();
        if !(MIN_LEN..=MAX_LEN).contains(&n) {
            return Err(ApiError::validation(
                "password",
                format!("The password must be {MIN_LEN} to {MAX_LEN} characters long."),
            ));
        }
        Ok(Password(raw))
    }
}

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub async fn hash(password: Password) -> anyhow::Result<String> {
    spawn_blocking_with_span(move || {
        let salt = SaltString::generate(&mut OsRng);
        hasher()
            .hash_password(password.0.expose_secret().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
    })
    .await?
}

/// Verifies `candidate` against a stored PHC string. With no stored hash (unknown email, or
/// an account without a password) it still spends the same work on a dummy hash, so the
/// answer's timing does not reveal whether the email exists.
pub async fn verify(candidate: SecretString, stored: Option<String>) -> anyhow::Result<bool> {
    spawn_blocking_with_span(move || {
        let stored_ok = stored.is_some();
        let phc = stored.unwrap_or_else(|| DUMMY_HASH.to_owned());
        let parsed = PasswordHash::new(&phc).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
        let ok = hasher()
            .verify_password(candidate.expose_secret().as_bytes(), &parsed)
            .is_ok();
        Ok(ok && stored_ok)
    })
    .await?
}

/// An Argon2id hash (same parameters) of a random string nobody knows.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$ZJg4Xlo9KVF2JmVhkTbDpwq9cKk0nTqHFxW1UVJmE8A";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let h = hash(Password::parse("correct horse".to_owned().into()).unwrap())
            .await
            .unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse".to_owned().into(), Some(h.clone()))
            .await
            .unwrap());
        assert!(!verify("wrong horse".to_owned().into(), Some(h))
            .await
            .unwrap());
        assert!(!verify("anything".to_owned().into(), None).await.unwrap());
    }

    #[test]
    fn length_rules_count_characters() {
        assert!(Password::parse("short".to_owned().into()).is_err());
        assert!(Password::parse("ääääääää".to_owned().into()).is_ok());
        assert!(Password::parse("x".repeat(129).into()).is_err());
        assert!(Password::parse("x".repeat(128).into()).is_ok());
    }
}
