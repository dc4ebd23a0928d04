//! Account passwords: Argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane), hashed on
//! the blocking pool so a signup storm cannot stall the async workers.
//!
//! Each hash or verification costs 19 MiB and tens of milliseconds of a core, and anyone can
//! ask for one (signup and login need no key). So they run under [`Passwords`]: a fixed
//! number at a time (about one per core) and a short, bounded line behind them; an attempt
//! that finds the line full is refused at once with `503 password_hashing_busy` and
//! `Retry-After`, instead of queueing in memory without end or starving the other requests
//! of CPU.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use prometheus::{IntCounter, IntCounterVec, Opts};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Error;
use crate::telemetry::spawn_blocking_with_span;

pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 128;

/// A password that met the length rules. Only ever held as a secret.
pub struct Password(SecretString);

impl Password {
    pub fn parse(raw: SecretString) -> Result<Password, Error> {
        let n = raw.expose_secret().chars().count();
        if !(MIN_LEN..=MAX_LEN).contains(&n) {
            return Err(Error::InvalidPassword);
        }
        Ok(Password(raw))
    }
}

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Bounds the Argon2 work of one instance (see the module comment), and counts it.
pub struct Passwords {
    /// One permit per hash or verification running.
    running: Arc<Semaphore>,
    /// One permit per attempt running or waiting: `running` plus the line's length.
    admitted: Arc<Semaphore>,
    counters: Counters,
}

/// This application's counts of Argon2 work: exact per instance, so what one test's app did
/// can be read from its own `/metrics`.
#[derive(Clone)]
struct Counters {
    family: IntCounterVec,
    refused: IntCounterVec,
    hashes: IntCounter,
    verifications: IntCounter,
    hashes_refused: IntCounter,
    verifications_refused: IntCounter,
}

/// How long an admitted attempt may wait for a running slot before it is refused; the line
/// is short, so this is only reached when hashing is far slower than it should be.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// What the refused attempt is told to wait, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

#[derive(Clone, Copy)]
enum Op {
    Hash,
    Verify,
}

impl Passwords {
    /// `concurrency` hashes at a time (at least one), with up to `queue` more attempts
    /// waiting for one.
    pub fn new(concurrency: usize, queue: usize) -> anyhow::Result<Passwords> {
        let concurrency = concurrency.max(1);
        let family = IntCounterVec::new(
            Opts::new(
                "keymeter_password_hash_operations_total",
                "Argon2 computations run by this instance: operation=hash (signup) or verify (login, unknown emails included).",
            ),
            &["operation"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "keymeter_password_hash_refusals_total",
                "Signups and logins refused with 503 password_hashing_busy because this instance's Argon2 slots and line were full.",
            ),
            &["operation"],
        )?;
        Ok(Passwords {
            running: Arc::new(Semaphore::new(concurrency)),
            admitted: Arc::new(Semaphore::new(concurrency.saturating_add(queue))),
            counters: Counters {
                hashes: family.get_metric_with_label_values(&["hash"])?,
                verifications: family.get_metric_with_label_values(&["verify"])?,
                hashes_refused: refused.get_metric_with_label_values(&["hash"])?,
                verifications_refused: refused.get_metric_with_label_values(&["verify"])?,
                family,
                refused,
            },
        })
    }

    /// The counters, for this application's metrics registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.counters.family.clone()),
            Box::new(self.counters.refused.clone()),
        ]
    }

    /// A slot to hash a new password in, or [`Error::PasswordHashingBusy`].
    pub async fn slot_for_hash(&self) -> Result<Slot, Error> {
        self.slot(Op::Hash).await
    }

    /// A slot to verify a password in, or [`Error::PasswordHashingBusy`]. Taken before the
    /// login attempt is counted against the email, so a refusal here costs it nothing.
    pub async fn slot_for_verify(&self) -> Result<Slot, Error> {
        self.slot(Op::Verify).await
    }

    async fn slot(&self, op: Op) -> Result<Slot, Error> {
        let refused = || {
            match op {
                Op::Hash => self.counters.hashes_refused.inc(),
                Op::Verify => self.counters.verifications_refused.inc(),
            }
            Error::PasswordHashingBusy {
                retry_after: RETRY_AFTER_SECS,
            }
        };
        // Never wait to join the line: a full line answers at once.
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused())?;
        let running =
            match tokio::time::timeout(MAX_WAIT, self.running.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => return Err(refused()),
            };
        Ok(Slot {
            permits: (admitted, running),
            counters: self.counters.clone(),
        })
    }
}

/// Leave to run one Argon2 computation. The permits move into the blocking task and are
/// released when the computation ends — not when the request does: a client that hangs up
/// mid-hash must not free a slot while its hash still burns the core.
pub struct Slot {
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    counters: Counters,
}

impl Slot {
    pub async fn hash(self, password: Password) -> anyhow::Result<String> {
        self.counters.hashes.inc();
        let permits = self.permits;
        spawn_blocking_with_span(move || {
            let _permits = permits;
            hash_now(&password)
        })
        .await?
    }

    /// Whether `candidate` matches `stored`; with no stored hash, the same work on a dummy
    /// one and `false`, so timing does not tell whether the email exists.
    pub async fn verify(
        self,
        candidate: SecretString,
        stored: Option<String>,
    ) -> anyhow::Result<bool> {
        self.counters.verifications.inc();
        let permits = self.permits;
        spawn_blocking_with_span(move || {
            let _permits = permits;
            verify_now(&candidate, stored)
        })
        .await?
    }
}

fn hash_now(password: &Password) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    hasher()
        .hash_password(password.0.expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

/// Verifies `candidate` against a stored PHC string. With no stored hash (unknown email, or
/// an account without a password) it still spends the same work on a dummy hash, so the
/// answer's timing does not reveal whether the email exists.
fn verify_now(candidate: &SecretString, stored: Option<String>) -> anyhow::Result<bool> {
    let stored_ok = stored.is_some();
    let phc = stored.unwrap_or_else(|| DUMMY_HASH.to_owned());
    let parsed = PasswordHash::new(&phc).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
    let ok = hasher()
        .verify_password(candidate.expose_secret().as_bytes(), &parsed)
        .is_ok();
    Ok(ok && stored_ok)
}

/// An Argon2id hash (same parameters) of a random string nobody knows.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$ZJg4Xlo9KVF2JmVhkTbDpwq9cKk0nTqHFxW1UVJmE8A";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let p = Passwords::new(2, 0).unwrap();
        let pw = |s: &str| Password::parse(s.to_owned().into()).unwrap();
        let h = p
            .slot_for_hash()
            .await
            .unwrap()
            .hash(pw("correct horse"))
            .await
            .unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let verify = |c: &str, stored: Option<String>| {
            let c = SecretString::from(c.to_owned());
            let p = &p;
            async move {
                p.slot_for_verify()
                    .await
                    .unwrap()
                    .verify(c, stored)
                    .await
                    .unwrap()
            }
        };
        assert!(verify("correct horse", Some(h.clone())).await);
        assert!(!verify("wrong horse", Some(h)).await);
        assert!(!verify("anything", None).await);
        assert_eq!(p.counters.hashes.get(), 1);
        assert_eq!(p.counters.verifications.get(), 3);
    }

    #[tokio::test]
    async fn a_full_line_is_refused_at_once() {
        let p = Passwords::new(1, 0).unwrap();
        let held = p.slot_for_verify().await.unwrap();
        let refused = p
            .slot_for_hash()
            .await
            .err()
            .expect("the only slot is taken");
        assert!(matches!(
            refused,
            Error::PasswordHashingBusy { retry_after: 1 }
        ));
        assert_eq!(p.counters.hashes_refused.get(), 1);
        drop(held);
        assert!(p.slot_for_hash().await.is_ok());
    }

    #[test]
    fn length_rules_count_characters() {
        assert!(Password::parse("short".to_owned().into()).is_err());
        assert!(Password::parse("ääääääää".to_owned().into()).is_ok());
        assert!(Password::parse("x".repeat(129).into()).is_err());
        assert!(Password::parse("x".repeat(128).into()).is_ok());
    }
}
