//! Scrape-time collectors: values read from one application's resources when Prometheus
//! asks, not pushed by a loop — a scrape always sees the pool and the cache as they are.

use std::sync::Mutex;

use deadpool_postgres::Pool;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::auth::cache::KeyCache;

/// deadpool's `Pool::status()` as gauges.
pub(super) struct PoolCollector {
    pool: Pool,
    size: IntGauge,
    max: IntGauge,
    available: IntGauge,
    waiting: IntGauge,
}

impl PoolCollector {
    pub(super) fn new(pool: Pool) -> prometheus::Result<PoolCollector> {
        Ok(PoolCollector {
            pool,
            size: IntGauge::new(
                "keymeter_db_pool_connections",
                "Database connections the pool holds (in use and idle).",
            )?,
            max: IntGauge::new(
                "keymeter_db_pool_max_connections",
                "The pool's configured maximum (KEYMETER_DB_POOL_SIZE).",
            )?,
            available: IntGauge::new(
                "keymeter_db_pool_available_connections",
                "Idle connections ready to be handed out.",
            )?,
            waiting: IntGauge::new(
                "keymeter_db_pool_waiting_tasks",
                "Tasks waiting for a connection (each gives up after KEYMETER_DB_POOL_TIMEOUT_MS).",
            )?,
        })
    }

    fn gauges(&self) -> [&IntGauge; 4] {
        [&self.size, &self.max, &self.available, &self.waiting]
    }
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges().into_iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = self.pool.status();
        self.size.set(as_i64(s.size));
        self.max.set(as_i64(s.max_size));
        self.available.set(as_i64(s.available));
        self.waiting.set(as_i64(s.waiting));
        self.gauges()
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

/// The key cache's own hit and miss counts (atomics it keeps anyway) as one counter family,
/// so `hit / (hit + miss)` is the hit ratio.
pub(super) struct KeyCacheCollector {
    cache: KeyCache,
    lookups: IntCounterVec,
    hits: IntCounter,
    misses: IntCounter,
    /// What has been added to the counters so far: each scrape adds the difference. The lock
    /// keeps two concurrent scrapes from adding the same difference twice.
    exported: Mutex<(u64, u64)>,
}

impl KeyCacheCollector {
    pub(super) fn new(cache: KeyCache) -> prometheus::Result<KeyCacheCollector> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "keymeter_key_cache_lookups_total",
                "Key cache lookups by result (hit, miss); a miss costs one indexed query.",
            ),
            &["result"],
        )?;
        Ok(KeyCacheCollector {
            cache,
            hits: lookups.get_metric_with_label_values(&["hit"])?,
            misses: lookups.get_metric_with_label_values(&["miss"])?,
            lookups,
            exported: Mutex::new((0, 0)),
        })
    }
}

impl Collector for KeyCacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.lookups.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let stats = self.cache.stats();
        let (hits, misses) = (stats.hits.load(Relaxed), stats.misses.load(Relaxed));
        self.hits.inc_by(hits.saturating_sub(exported.0));
        self.misses.inc_by(misses.saturating_sub(exported.1));
        *exported = (hits.max(exported.0), misses.max(exported.1));
        self.lookups.collect()
    }
}

/// The backlog of work waiting in the database: how long the oldest claimable job has waited,
/// and the job-webhook outbox. Set by an `on_scrape` hook that reads the tables (every
/// instance sees the same shared queue, so every instance reports the same values: alert
/// on `max`, not `sum`), and kept in this application's own registry so one application's
/// values never overwrite another's.
///
/// These answer what counters cannot: a queue that stopped moving, and deliveries that keep
/// failing, whichever instance's sender tried them — without touching the sending code.
#[derive(Clone)]
pub struct Backlog {
    oldest_claimable: Gauge,
    webhooks_pending: IntGauge,
    webhooks_retrying: IntGauge,
    webhooks_failing_accounts: IntGauge,
    webhooks_overdue: Gauge,
}

impl Backlog {
    pub(super) fn new() -> prometheus::Result<Backlog> {
        Ok(Backlog {
            oldest_claimable: Gauge::new(
                "keymeter_jobs_oldest_claimable_age_seconds",
                "How long the oldest queued scrape job a worker could take now (its account below its running-job limit) has waited; 0 when none.",
            )?,
            webhooks_pending: IntGauge::new(
                "keymeter_job_webhooks_pending",
                "Job webhook deliveries neither delivered nor given up.",
            )?,
            webhooks_retrying: IntGauge::new(
                "keymeter_job_webhooks_retrying",
                "Pending job webhook deliveries whose last attempt failed (they will be retried).",
            )?,
            webhooks_failing_accounts: IntGauge::new(
                "keymeter_job_webhooks_failing_accounts",
                "Accounts with at least one retrying job webhook delivery.",
            )?,
            webhooks_overdue: Gauge::new(
                "keymeter_job_webhooks_overdue_seconds",
                "How far past its due time the most overdue pending job webhook delivery is (0 when none is due).",
            )?,
        })
    }

    /// The age of the oldest claimable job, seconds.
    pub fn set_oldest_claimable(&self, secs: f64) {
        self.oldest_claimable.set(secs.max(0.0));
    }

    /// The outbox: pending deliveries, those whose last attempt failed, the accounts they
    /// belong to, and how late the most overdue one is (seconds).
    pub fn set_webhooks(&self, pending: i64, retrying: i64, failing_accounts: i64, overdue: f64) {
        self.webhooks_pending.set(pending);
        self.webhooks_retrying.set(retrying);
        self.webhooks_failing_accounts.set(failing_accounts);
        self.webhooks_overdue.set(overdue.max(0.0));
    }

    fn collectors(&self) -> [&dyn Collector; 5] {
        [
            &self.oldest_claimable,
            &self.webhooks_pending,
            &self.webhooks_retrying,
            &self.webhooks_failing_accounts,
            &self.webhooks_overdue,
        ]
    }
}

impl Collector for Backlog {
    fn desc(&self) -> Vec<&Desc> {
        self.collectors()
            .into_iter()
            .flat_map(|c| c.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.collectors()
            .into_iter()
            .flat_map(|c| c.collect())
            .collect()
    }
}
