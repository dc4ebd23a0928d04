//! The key cache: moka, keyed by key id, holding what verification needs (digest, scopes,
//! validity times, the account's tier and status).
//!
//! - A miss runs one indexed query; `try_get_with` coalesces concurrent misses for one id
//!   into that single query and does not cache errors (a database blip is not remembered).
//! - The load runs in its own task: moka warns that an init future dropped mid-way (the
//!   client hung up) can stall the other waiters, so the query always runs to completion.
//! - Unknown ids are cached as `None` for a few seconds, so a flood of made-up (but
//!   checksum-valid) keys costs one query per id, not one per request.
//! - Entries live at most `positive_ttl` (≤ 60 s): the backstop if a NOTIFY is ever lost.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use moka::future::Cache;
use moka::Expiry;
use uuid::Uuid;

use super::api_key::KeyDigest;
use super::Scopes;
use crate::db::Error as DbError;

#[derive(Debug)]
pub struct KeyRecord {
    pub account_id: Uuid,
    pub digest: KeyDigest,
    pub scopes: Scopes,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    /// The key's own requests per minute, on top of its account's tier limit.
    pub rate_limit: Option<u32>,
    pub tier: String,
    pub account_active: bool,
    /// Unix seconds of the last `last_used_at` mark queued for this key (see `last_used`).
    pub last_used_mark: AtomicI64,
}

impl KeyRecord {
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.account_active
            && self.revoked_at.is_none_or(|t| t > now)
            && self.expires_at.is_none_or(|t| t > now)
            && self.grace_until.is_none_or(|t| t > now)
    }
}

type Entry = Option<Arc<KeyRecord>>;

struct TtlByKind {
    positive: Duration,
    negative: Duration,
}

impl Expiry<String, Entry> for TtlByKind {
    fn expire_after_create(&self, _key: &String, value: &Entry, _now: Instant) -> Option<Duration> {
        Some(if value.is_some() {
            self.positive
        } else {
            self.negative
        })
    }
}

#[derive(Clone)]
pub struct KeyCache {
    inner: Cache<String, Entry>,
    stats: Arc<CacheStats>,
    /// Bumped by every invalidation. A load that overlapped one may have read the row
    /// before the change committed, so its entry is dropped again right after it lands.
    generation: Arc<AtomicU64>,
}

#[derive(Default, Debug)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

#[derive(Debug, Clone, thiserror::Error)]
enum LoadError {
    #[error("database unavailable")]
    Unavailable,
    #[error("{0}")]
    Other(String),
}

impl KeyCache {
    pub fn new(capacity: u64, positive_ttl: Duration, negative_ttl: Duration) -> KeyCache {
        KeyCache {
            inner: Cache::builder()
                .max_capacity(capacity)
                .expire_after(TtlByKind {
                    positive: positive_ttl,
                    negative: negative_ttl,
                })
                .support_invalidation_closures()
                .build(),
            stats: Arc::default(),
            generation: Arc::default(),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub async fn get(&self, key_id: &str, db: &Pool) -> Result<Entry, DbError> {
        // Boxed, hit or miss: moka's read future is about 800 bytes (a read may run the
        // cache's housekeeping inline), and held inline it pushed every keyed request's
        // future — which actix boxes — past glibc's small-allocation limit (1 KiB), onto
        // the slow path (malloc_consolidate and all, measured with callgrind). Apart, both
        // boxes stay small.
        if let Some(hit) = Box::pin(self.inner.get(key_id)).await {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        // Boxed: the miss's future (moka's coalescing, the spawned query) is several times
        // the size of the hit's, and an unboxed one would make every request's future — which
        // actix allocates and moves for each request — that large, hit or miss.
        Box::pin(self.load_missing(key_id, db)).await
    }

    /// A miss: one query, shared by every concurrent miss for this id (see the module doc).
    async fn load_missing(&self, key_id: &str, db: &Pool) -> Result<Entry, DbError> {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let db = db.clone();
        let id = key_id.to_owned();
        let load = async move {
            let task = tokio::spawn(async move { load(&db, &id).await });
            match task.await {
                Ok(r) => r,
                Err(e) => Err(LoadError::Other(format!("key load task failed: {e}"))),
            }
        };
        let generation = self.generation.load(Ordering::Acquire);
        let result = self.inner.try_get_with(key_id.to_owned(), load).await;
        if self.generation.load(Ordering::Acquire) != generation {
            self.inner.invalidate(key_id).await;
        }
        result.map_err(|e| match &*e {
            LoadError::Unavailable => DbError::Unavailable("key lookup".into()),
            LoadError::Other(m) => DbError::Other(anyhow::anyhow!("loading a key: {m}")),
        })
    }

    pub async fn invalidate_key(&self, key_id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate(key_id).await;
    }

    pub fn invalidate_account(&self, account_id: Uuid) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let result = self.inner.invalidate_entries_if(move |_, v| {
            v.as_ref().is_some_and(|r| r.account_id == account_id)
        });
        if result.is_err() {
            // Closures are enabled at build time; if that ever changed, drop everything
            // rather than serve a stale tier or status.
            self.inner.invalidate_all();
        }
    }

    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.inner.invalidate_all();
    }
}

async fn load(db: &Pool, key_id: &str) -> Result<Entry, LoadError> {
    let client = db.get().await.map_err(|e| {
        tracing::warn!(error = %e, "key lookup: no database connection");
        LoadError::Unavailable
    })?;
    let stmt = client
        .prepare_cached(
            "SELECT k.account_id, k.digest, k.scopes, k.expires_at, k.revoked_at, k.grace_until,
                    a.tier, a.status, k.rate_limit
               FROM api_keys k JOIN accounts a ON a.id = k.account_id
              WHERE k.id = $1",
        )
        .await
        .map_err(classify)?;
    let row = client
        .query_opt(&stmt, &[&key_id])
        .await
        .map_err(classify)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let digest: Vec<u8> = row.get(1);
    let Ok(digest) = <[u8; 32]>::try_from(digest.as_slice()) else {
        return Err(LoadError::Other("stored digest is not 32 bytes".into()));
    };
    let scopes: Vec<String> = row.get(2);
    let status: String = row.get(7);
    let rate_limit: Option<i32> = row.get(8);
    Ok(Some(Arc::new(KeyRecord {
        account_id: row.get(0),
        digest: KeyDigest(digest),
        scopes: Scopes::from_strs(&scopes),
        expires_at: row.get(3),
        revoked_at: row.get(4),
        grace_until: row.get(5),
        // The column's CHECK keeps it positive; a negative could only mean "no limit of its own".
        rate_limit: rate_limit.and_then(|r| u32::try_from(r).ok()),
        tier: row.get(6),
        account_active: status == "active",
        last_used_mark: AtomicI64::new(0),
    })))
}

fn classify(e: tokio_postgres::Error) -> LoadError {
    if crate::db::is_connection_error(&e) {
        LoadError::Unavailable
    } else {
        LoadError::Other(e.to_string())
    }
}
