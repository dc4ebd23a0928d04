//! Pricing tiers: requests per minute with a burst (for the whole account, across all its
//! keys), how many active keys an account may hold, job concurrency and queue caps, and the
//! credit price of each job format.
//!
//! Built-in defaults follow the market (Firecrawl's free plan is 10 scrapes a minute and 2
//! concurrent browsers); a TOML file named by `KEYMETER_TIERS` overrides or adds tiers. The
//! `internal` tier is always present and unlimited, for the operator's own services,
//! monitoring and benchmarks.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub const JOB_FORMATS: [&str; 5] = ["metadata", "text", "markdown", "links", "html"];
pub const DEFAULT_TIER: &str = "free";
pub const INTERNAL_TIER: &str = "internal";
/// The key cap of a tier a tiers file adds without one (the free tier's).
pub const DEFAULT_MAX_KEYS: u32 = 10;
/// The low-balance alert threshold of a tier a tiers file adds without one (the free tier's).
pub const DEFAULT_LOW_BALANCE_THRESHOLD: i64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(skip_deserializing)]
    pub name: String,
    pub requests_per_minute: u32,
    pub burst: u32,
    pub max_concurrent_jobs: u32,
    pub max_queued_jobs: u32,
    /// Active (unrevoked, unexpired, not rotated away) keys an account may hold. Without a
    /// cap, every key would be another row, cache entry and limiter state an account could
    /// make the server keep. `None` only for unlimited tiers; a file that leaves it out keeps
    /// the built-in tier's value, or [`DEFAULT_MAX_KEYS`] for a new tier.
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Credits per requested format; a job costs the sum of its formats.
    #[serde(default = "default_prices")]
    pub prices: BTreeMap<String, i64>,
    /// No request or job limits at all.
    #[serde(default)]
    pub unlimited: bool,
    /// `balance.low` fires when a charge takes the balance below this, unless the account
    /// set its own (`PUT /v1/account/alerts`). About a day of a small account's use on the
    /// built-in tiers; 0 turns the default alert off. A file that leaves it out keeps the
    /// built-in tier's value, or [`DEFAULT_LOW_BALANCE_THRESHOLD`] for a new tier.
    #[serde(default)]
    pub low_balance_threshold: Option<i64>,
}

fn default_prices() -> BTreeMap<String, i64> {
    JOB_FORMATS.iter().map(|f| ((*f).to_owned(), 1)).collect()
}

fn tier(name: &str, rpm: u32, burst: u32, running: u32, queued: u32, keys: u32) -> Tier {
    Tier {
        name: name.to_owned(),
        requests_per_minute: rpm,
        burst,
        max_concurrent_jobs: running,
        max_queued_jobs: queued,
        max_keys: Some(keys),
        prices: default_prices(),
        unlimited: false,
        low_balance_threshold: Some(DEFAULT_LOW_BALANCE_THRESHOLD),
    }
}

impl Tier {
    /// The tier's default low-balance threshold (see the field).
    pub fn low_balance_threshold(&self) -> i64 {
        self.low_balance_threshold.unwrap_or(0)
    }
}

/// The tier table, shared read-only by every worker.
#[derive(Debug, Clone)]
pub struct Tiers {
    by_name: Arc<BTreeMap<String, Tier>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TiersFile {
    #[serde(default)]
    tiers: BTreeMap<String, Tier>,
}

impl Tiers {
    pub fn builtin() -> Tiers {
        let mut m = BTreeMap::new();
        for (t, low) in [
            (
                tier("free", 10, 5, 2, 10, 10),
                DEFAULT_LOW_BALANCE_THRESHOLD,
            ),
            (tier("pro", 120, 30, 10, 1000, 100), 100),
            (tier("business", 1200, 200, 50, 10000, 1000), 1000),
        ] {
            let mut t = t;
            t.low_balance_threshold = Some(low);
            m.insert(t.name.clone(), t);
        }
        let mut internal = tier(INTERNAL_TIER, u32::MAX, u32::MAX, u32::MAX, u32::MAX, 0);
        internal.unlimited = true;
        internal.max_keys = None;
        // The operator's own services: no alerts.
        internal.low_balance_threshold = Some(0);
        m.insert(INTERNAL_TIER.to_owned(), internal);
        Tiers {
            by_name: Arc::new(m),
        }
    }

    /// Built-ins, overridden and extended by the TOML text of a tiers file.
    pub fn from_toml(text: &str) -> anyhow::Result<Tiers> {
        let file: TiersFile = toml::from_str(text).context("parsing the tiers file")?;
        let mut m = (*Tiers::builtin().by_name).clone();
        for (name, mut t) in file.tiers {
            if name == INTERNAL_TIER {
                bail!("tier `internal` is built in and cannot be redefined");
            }
            if name == crate::ratelimit::KEY_POLICY {
                // The rate-limit headers name a key's own limit `key`; a tier of that name
                // would make the two indistinguishable.
                bail!("tier name `key` is reserved");
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                bail!("tier name {name:?} must be letters, digits, _ or -");
            }
            if t.requests_per_minute == 0 || t.burst == 0 {
                bail!("tier {name}: requests_per_minute and burst must be at least 1");
            }
            for f in t.prices.keys() {
                if !JOB_FORMATS.contains(&f.as_str()) {
                    bail!(
                        "tier {name}: unknown format {f:?} in prices (known: {})",
                        JOB_FORMATS.join(", ")
                    );
                }
            }
            for f in JOB_FORMATS {
                t.prices.entry(f.to_owned()).or_insert(1);
            }
            if t.prices.values().any(|p| *p < 0) {
                bail!("tier {name}: prices must not be negative");
            }
            match t.max_keys {
                Some(0) => bail!("tier {name}: max_keys must be at least 1"),
                Some(_) => {}
                None => {
                    t.max_keys = Some(
                        m.get(&name)
                            .and_then(|b: &Tier| b.max_keys)
                            .unwrap_or(DEFAULT_MAX_KEYS),
                    );
                }
            }
            match t.low_balance_threshold {
                Some(v) if !(0..=crate::credits::alerts::MAX_THRESHOLD).contains(&v) => bail!(
                    "tier {name}: low_balance_threshold must be between 0 and {}",
                    crate::credits::alerts::MAX_THRESHOLD
                ),
                Some(_) => {}
                None => {
                    t.low_balance_threshold = Some(
                        m.get(&name)
                            .and_then(|b: &Tier| b.low_balance_threshold)
                            .unwrap_or(DEFAULT_LOW_BALANCE_THRESHOLD),
                    );
                }
            }
            t.name = name.clone();
            m.insert(name, t);
        }
        if !m.contains_key(DEFAULT_TIER) {
            bail!("the tiers file must keep a `{DEFAULT_TIER}` tier");
        }
        Ok(Tiers {
            by_name: Arc::new(m),
        })
    }

    pub fn load(path: Option<&str>) -> anyhow::Result<Tiers> {
        match path {
            None => Ok(Tiers::builtin()),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("KEYMETER_TIERS: cannot read {p}"))?;
                Tiers::from_toml(&text).with_context(|| format!("KEYMETER_TIERS: {p}"))
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tier> {
        self.by_name.get(name)
    }

    /// The tier of an account whose stored tier is unknown to this configuration (removed from
    /// the file): it falls back to the default tier rather than to unlimited.
    pub fn get_or_default(&self, name: &str) -> &Tier {
        self.by_name
            .get(name)
            .or_else(|| self.by_name.get(DEFAULT_TIER))
            .unwrap_or_else(|| unreachable_default())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cold]
fn unreachable_default() -> &'static Tier {
    // `from_toml` guarantees the default tier exists; this keeps the signature total.
    static FALLBACK: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
    FALLBACK.get_or_init(|| tier(DEFAULT_TIER, 10, 5, 2, 10, DEFAULT_MAX_KEYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_table() {
        let t = Tiers::builtin();
        let free = t.get("free").unwrap();
        assert_eq!((free.requests_per_minute, free.burst), (10, 5));
        assert_eq!((free.max_concurrent_jobs, free.max_queued_jobs), (2, 10));
        let pro = t.get("pro").unwrap();
        assert_eq!(
            (
                pro.requests_per_minute,
                pro.burst,
                pro.max_concurrent_jobs,
                pro.max_queued_jobs
            ),
            (120, 30, 10, 1000)
        );
        let b = t.get("business").unwrap();
        assert_eq!(
            (
                b.requests_per_minute,
                b.burst,
                b.max_concurrent_jobs,
                b.max_queued_jobs
            ),
            (1200, 200, 50, 10000)
        );
        assert!(t.get("internal").unwrap().unlimited);
        let max_keys = |n| t.get(n).unwrap().max_keys;
        assert_eq!(
            [max_keys("free"), max_keys("pro"), max_keys("business")],
            [Some(10), Some(100), Some(1000)]
        );
        assert_eq!(max_keys("internal"), None, "internal: unlimited keys");
        let low = |n| t.get(n).unwrap().low_balance_threshold();
        assert_eq!(
            [low("free"), low("pro"), low("business"), low("internal")],
            [10, 100, 1000, 0]
        );
    }

    #[test]
    fn a_file_sets_or_keeps_the_low_balance_threshold() {
        let t = Tiers::from_toml(
            "[tiers.pro]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\n\
             [tiers.gold]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\nlow_balance_threshold=5000",
        )
        .unwrap();
        assert_eq!(t.get("pro").unwrap().low_balance_threshold(), 100, "kept");
        assert_eq!(t.get("gold").unwrap().low_balance_threshold(), 5000);
        assert!(Tiers::from_toml(
            "[tiers.x]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\nlow_balance_threshold=-1"
        )
        .is_err());
    }

    #[test]
    fn a_file_overrides_and_adds_tiers() {
        let t = Tiers::from_toml(
            r#"
            [tiers.free]
            requests_per_minute = 20
            burst = 10
            max_concurrent_jobs = 1
            max_queued_jobs = 5
            prices = { markdown = 3 }

            [tiers.enterprise]
            requests_per_minute = 6000
            burst = 1000
            max_concurrent_jobs = 200
            max_queued_jobs = 100000
            "#,
        )
        .unwrap();
        assert_eq!(t.get("free").unwrap().requests_per_minute, 20);
        assert_eq!(t.get("free").unwrap().prices["markdown"], 3);
        assert_eq!(t.get("free").unwrap().prices["text"], 1);
        assert!(t.get("enterprise").is_some());
        assert!(t.get("pro").is_some());
        assert_eq!(
            t.get("free").unwrap().max_keys,
            Some(10),
            "kept from the built-in"
        );
        assert_eq!(
            t.get("enterprise").unwrap().max_keys,
            Some(DEFAULT_MAX_KEYS)
        );
        let t = Tiers::from_toml(
            "[tiers.pro]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\nmax_keys=3",
        )
        .unwrap();
        assert_eq!(t.get("pro").unwrap().max_keys, Some(3));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        assert!(Tiers::from_toml("[tiers.internal]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1").is_err());
        assert!(Tiers::from_toml(
            "[tiers.x]\nrequests_per_minute=0\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1"
        )
        .is_err());
        assert!(Tiers::from_toml("[tiers.x]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\nprices={pdf=1}").is_err());
        assert!(Tiers::from_toml("[tiers.x]\nrpm=1").is_err());
        assert!(Tiers::from_toml(
            "[tiers.x]\nrequests_per_minute=1\nburst=1\nmax_concurrent_jobs=1\nmax_queued_jobs=1\nmax_keys=0"
        )
        .is_err());
    }
}
