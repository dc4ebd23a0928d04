//! API-key verification cost: `cargo bench --bench verify`.
//!
//! - `parse/valid_key`: format + CRC-32 + SHA-256 of a valid key, no I/O;
//! - `authenticate/cache_hit`: the whole hot path when the key id is in the moka cache;
//! - `authenticate/cold_cache/<n>_keys`: the cache is emptied (untimed) before every call,
//!   so each call is a miss that does the one indexed `SELECT` by primary key, with `n`
//!   filler rows in `api_keys` (1,000 and 1,000,000).
//!
//! The bench creates its own database `keymeter_bench_<random>` on the server named by
//! `TEST_DATABASE_URL`, else `DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/postgres`
//! (a `postgres://` URL), runs the migrations in it and drops it at the end, also on panic.
//! Run under `cargo test --benches` (criterion's test mode, every bench once) it seeds
//! 10,000 filler keys instead of 1,000,000.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use keymeter::auth::cache::KeyCache;
use keymeter::auth::{api_key, AuthService};
use tokio::runtime::Runtime;
use tokio_postgres::NoTls;
use uuid::Uuid;

const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Inserts `n` filler keys (random base62 ids, random 32-byte digests) in one statement.
/// An id collision (≈ n²/62¹² odds) only skips that row; the caller reports the real count.
const SEED_FILLER: &str = "
    INSERT INTO api_keys (id, account_id, name, digest, scopes)
    SELECT substr(translate(encode(decode(md5(random()::text || g::text)
                                          || md5(g::text || random()::text), 'hex'), 'base64'),
                            '+/=', ''), 1, 12),
           $1, 'filler',
           decode(md5(random()::text) || md5(random()::text), 'hex'),
           ARRAY['read']
      FROM generate_series(1, $2::bigint) AS g
    ON CONFLICT (id) DO NOTHING";

fn server_url() -> String {
    ["TEST_DATABASE_URL", "DATABASE_URL"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER_URL.to_owned())
}

/// The same `postgres://` URL with its database name replaced (query string kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base
        .find("://")
        .map(|i| i + 3)
        .expect("TEST_DATABASE_URL/DATABASE_URL must be a postgres:// URL");
    let path = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{db}", &base[..path]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("connecting to PostgreSQL (TEST_DATABASE_URL/DATABASE_URL): {e}")
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The bench's own database; dropped when this goes out of scope (panics included).
struct BenchDatabase {
    server_url: String,
    name: String,
}

impl BenchDatabase {
    fn create(rt: &Runtime) -> BenchDatabase {
        let server_url = server_url();
        let name = format!("keymeter_bench_{:016x}", rand::random::<u64>());
        rt.block_on(async {
            admin_client(&server_url)
                .await
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("CREATE DATABASE");
        });
        eprintln!("bench database: {name}");
        BenchDatabase { server_url, name }
    }

    fn url(&self) -> String {
        with_database(&self.server_url, &self.name)
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            eprintln!("could not drop database {}: no runtime", self.name);
            return;
        };
        let result = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&self.server_url, NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await
        });
        match result {
            Ok(()) => eprintln!("dropped bench database {}", self.name),
            Err(e) => eprintln!("could not drop database {}: {e}", self.name),
        }
    }
}

struct Fixture {
    svc: std::sync::Arc<AuthService>,
    account_id: Uuid,
    plaintext: String,
}

async fn fixture(db_url: &str) -> Fixture {
    let mut vars = HashMap::new();
    vars.insert("DATABASE_URL".to_owned(), db_url.to_owned());
    let config = keymeter::config::Config::from_source(&vars).expect("config");
    let pg_cfg = keymeter::db::pg_config(config.database_url().expect("url"), &config.database)
        .expect("pg config");
    keymeter::db::migrations::run(&pg_cfg)
        .await
        .expect("migrations");
    let pool = keymeter::db::build_pool(&pg_cfg, &config.database).expect("pool");

    let account_id = Uuid::new_v4();
    let new_key = api_key::generate();
    let client = pool.get().await.expect("connection");
    client
        .execute(
            "INSERT INTO accounts (id, email, tier) VALUES ($1, $2, 'internal')",
            &[&account_id, &format!("bench-{account_id}@example.com")],
        )
        .await
        .expect("insert account");
    client
        .execute(
            "INSERT INTO api_keys (id, account_id, name, digest, scopes)
             VALUES ($1, $2, 'bench', $3, ARRAY['read', 'scrape'])",
            &[&new_key.id, &account_id, &new_key.digest.0.as_slice()],
        )
        .await
        .expect("insert key");
    drop(client);

    // A long positive TTL: the cache-hit bench must not see an expiry mid-run.
    let cache = KeyCache::new(10_000, Duration::from_secs(600), Duration::from_secs(5));
    Fixture {
        svc: AuthService::new(pool, cache),
        account_id,
        plaintext: new_key.plaintext,
    }
}

/// Adds filler keys until `api_keys` holds `total` rows besides the bench key; returns the
/// real count. Uses its own connection: the pool's carry keymeter's 5 s `statement_timeout`,
/// and a million rows take longer than that.
async fn seed_filler(f: &Fixture, db_url: &str, total: i64) -> i64 {
    let client = admin_client(db_url).await;
    for _ in 0..3 {
        let have: i64 = client
            .query_one("SELECT count(*) FROM api_keys WHERE name = 'filler'", &[])
            .await
            .expect("count")
            .get(0);
        if have >= total {
            break;
        }
        client
            .execute(SEED_FILLER, &[&f.account_id, &(total - have)])
            .await
            .expect("seed filler keys");
    }
    client
        .batch_execute("VACUUM ANALYZE api_keys")
        .await
        .expect("vacuum");
    client
        .query_one("SELECT count(*) FROM api_keys WHERE name = 'filler'", &[])
        .await
        .expect("count")
        .get(0)
}

fn stats(f: &Fixture) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = f.svc.cache.stats();
    (s.hits.load(Relaxed), s.misses.load(Relaxed))
}

/// Mirrors criterion: no `--bench` (e.g. `cargo test --benches`) or `--test` means test mode.
fn test_mode() -> bool {
    let args: Vec<String> = std::env::args().collect();
    !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
}

fn bench_parse(c: &mut Criterion, plaintext: &str) {
    let mut g = c.benchmark_group("parse");
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("valid_key", |b| {
        b.iter(|| api_key::parse(black_box(plaintext)).expect("valid key"))
    });
    g.finish();
}

fn bench_cache_hit(c: &mut Criterion, rt: &Runtime, f: &Fixture) {
    let svc = &f.svc;
    let plaintext = f.plaintext.as_str();
    rt.block_on(svc.authenticate(Some(plaintext)))
        .expect("bench key authenticates");
    let before = stats(f);
    let mut g = c.benchmark_group("authenticate");
    g.measurement_time(Duration::from_secs(4));
    g.bench_function("cache_hit", |b| {
        b.to_async(rt)
            .iter(|| async move { svc.authenticate(Some(black_box(plaintext))).await })
    });
    g.finish();
    let after = stats(f);
    eprintln!(
        "cache_hit: {} hits, {} misses during the bench",
        after.0 - before.0,
        after.1 - before.1
    );
}

fn bench_cold(c: &mut Criterion, rt: &Runtime, f: &Fixture, filler: i64) {
    let svc = &f.svc;
    let plaintext = f.plaintext.as_str();
    let before = stats(f);
    let mut g = c.benchmark_group("authenticate/cold_cache");
    g.sample_size(50);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(6));
    g.bench_function(format!("{filler}_keys"), |b| {
        b.to_async(rt).iter_batched(
            || svc.cache.invalidate_all(),
            |()| async move {
                svc.authenticate(Some(black_box(plaintext)))
                    .await
                    .expect("bench key authenticates")
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    let after = stats(f);
    eprintln!(
        "cold_cache/{filler}_keys: {} hits, {} misses during the bench",
        after.0 - before.0,
        after.1 - before.1
    );
}

fn main() {
    let quick = test_mode();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let db = BenchDatabase::create(&rt);
    let f = rt.block_on(fixture(&db.url()));
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();

    bench_parse(&mut c, &f.plaintext);
    bench_cache_hit(&mut c, &rt, &f);

    let small = 1_000;
    let big = if quick { 10_000 } else { 1_000_000 };
    for target in [small, big] {
        let started = std::time::Instant::now();
        let n = rt.block_on(seed_filler(&f, &db.url(), target));
        eprintln!(
            "seeded {n} filler keys in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        bench_cold(&mut c, &rt, &f, target);
    }

    c.final_summary();
    drop(f);
    drop(rt);
    drop(db);
}
