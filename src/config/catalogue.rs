//! The list of every variable, for `keymeter --help`: name, default, one line of meaning.
//!
//! The parsers in the other files are the truth; this list is what an operator reads. Its
//! tests keep the two together: every variable the parsers read is listed (and nothing
//! else), every literal default listed here is what the parser falls back to, and the
//! README's configuration table and `.env.example` name every variable.

/// One variable as `--help` shows it.
pub struct Var {
    pub name: &'static str,
    /// The value used when the variable is unset. Text in parentheses describes a default
    /// that is not a literal value (computed, or "off"); empty: no default.
    pub default: &'static str,
    pub meaning: &'static str,
}

const fn var(name: &'static str, default: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        default,
        meaning,
    }
}

/// Every variable keymeter reads, by concern.
#[rustfmt::skip]
pub const VARS: &[(&str, &[Var])] = &[
    (
        "Database",
        &[
            var("DATABASE_URL", "", "PostgreSQL URL, required but for `dev`; its sslmode decides TLS"),
            var("KEYMETER_DB_CA_FILE", "(the public roots)", "PEM CA(s) the server's certificate must chain to"),
            var("KEYMETER_DB_POOL_SIZE", "16", "pooled connections"),
            var("KEYMETER_DB_POOL_TIMEOUT_MS", "2000", "wait for a pooled connection before answering 503"),
            var("KEYMETER_DB_CONNECT_TIMEOUT_MS", "2000", "opening a connection"),
            var("KEYMETER_DB_STATEMENT_TIMEOUT_MS", "5000", "server-side statement_timeout on every connection"),
            var("KEYMETER_DB_STARTUP_RETRY_SECS", "10", "how long start-up retries an unreachable database"),
            var("KEYMETER_AUTO_MIGRATE", "true", "`serve` migrates on start; false only verifies"),
        ],
    ),
    (
        "Process and telemetry",
        &[
            var("KEYMETER_ENV", "development", "production adds HSTS and stricter start-up checks"),
            var("KEYMETER_LOG", "info", "tracing filter, e.g. keymeter=debug,info"),
            var("KEYMETER_LOG_FORMAT", "(pretty; json in production)", "log lines on stderr: json or pretty"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT", "(no trace export)", "OTLP/HTTP collector base URL, e.g. http://127.0.0.1:4318"),
            var("OTEL_SERVICE_NAME", "keymeter", "the exported service.name"),
        ],
    ),
    (
        "HTTP",
        &[
            var("KEYMETER_BIND", "127.0.0.1:8080", "listen address"),
            var("KEYMETER_METRICS_BIND", "(/metrics on KEYMETER_BIND behind the admin token)", "a separate listener serving only GET /metrics, without a token"),
            var("KEYMETER_BODY_LIMIT", "65536", "largest request body, bytes"),
            var("KEYMETER_REQUEST_TIMEOUT_SECS", "75", "a request running longer gets 504"),
            var("KEYMETER_SHUTDOWN_TIMEOUT_SECS", "20", "drain time for in-flight requests on SIGTERM"),
            var("KEYMETER_SHUTDOWN_JOB_GRACE_SECS", "(5, at most the drain time)", "then how long running jobs may still finish"),
            var("KEYMETER_HTTP_WORKERS", "(one per core)", "HTTP worker threads"),
            var("KEYMETER_CORS_ORIGINS", "(CORS off)", "comma-separated allowed origins"),
            var("KEYMETER_TRUST_FORWARDED", "false", "behind a proxy: the client IP comes from X-Forwarded-For"),
            var("KEYMETER_TRUSTED_PROXIES", "(the TCP peer is the one proxy)", "comma-separated CIDRs or addresses of your proxies"),
        ],
    ),
    (
        "Accounts and keys",
        &[
            var("KEYMETER_ADMIN_TOKEN", "(admin API off)", "bearer token for /admin; 32+ characters in production"),
            var("KEYMETER_SIGNUP_ENABLED", "true", "self-serve signup on/off"),
            var("KEYMETER_SIGNUP_CREDITS", "0", "credits granted at signup"),
            var("KEYMETER_SIGNUP_CREDITS_TTL_DAYS", "0", "signup credits expire after this many days (0: never)"),
            var("KEYMETER_LOGIN_LOCKOUT_SECS", "900", "5 failed logins within this window lock the email as long again"),
            var("KEYMETER_PASSWORD_HASH_CONCURRENCY", "(one per core)", "Argon2 hashes at a time per instance"),
            var("KEYMETER_PASSWORD_HASH_QUEUE", "(4 x the concurrency)", "signups/logins that may wait for a hashing slot"),
            var("KEYMETER_KEY_CACHE_TTL_SECS", "30", "key cache entry lifetime (at most 60)"),
            var("KEYMETER_KEY_CACHE_CAPACITY", "100000", "key cache entries"),
        ],
    ),
    (
        "Rate limits",
        &[
            var("KEYMETER_TIERS", "(built-in tiers)", "path of a tiers TOML file"),
            var("KEYMETER_IP_RATE_PER_MINUTE", "60", "per-IP limit for routes without a key"),
            var("KEYMETER_IP_BURST", "20", "per-IP burst for routes without a key"),
            var("KEYMETER_AUTH_FAILURES_PER_MINUTE", "20", "failed authentications per IP before throttling"),
            var("KEYMETER_RATE_LIMIT_BACKEND", "memory", "redis shares account and key limits across instances"),
            var("REDIS_URL", "", "required with the Redis backend"),
            var("KEYMETER_RATE_LIMIT_ON_REDIS_ERROR", "memory", "refuse answers 503 while Redis is unreachable"),
            var("KEYMETER_REDIS_TIMEOUT_MS", "100", "a limit check waiting longer counts as Redis unavailable"),
        ],
    ),
    (
        "Credits and billing",
        &[
            var("KEYMETER_CHARGE_COALESCING", "true", "concurrent charges share a commit"),
            var("STRIPE_SECRET_KEY", "(checkout off)", "Stripe API key"),
            var("STRIPE_WEBHOOK_SECRET", "(webhook off)", "endpoint secret(s), comma-separated during a rotation"),
            var("STRIPE_API_BASE", "https://api.stripe.com", "Stripe API base URL"),
            var("KEYMETER_CREDIT_PACKS", "", "name:price_id:credits,..."),
            var("KEYMETER_PLANS", "", "name:price_id:tier:monthly_credits,..."),
            var("KEYMETER_WEBHOOK_BODY_LIMIT", "1048576", "body limit of the Stripe webhook route, bytes"),
        ],
    ),
    (
        "Gateway mode",
        &[
            var("KEYMETER_GATEWAY_ROUTES", "(every proxied route unmetered: 404)", "path of the priced-routes TOML file for /v1/authz"),
            var("KEYMETER_SERVICE_TOKENS", "(service routes refuse every token)", "comma-separated tokens of your servers (refunds, verify); 32+ characters in production"),
            var("KEYMETER_GATEWAY_CHARGE_RETENTION_DAYS", "35", "days a gateway charge stays refundable and its X-Request-Id replayable (1 to 3650)"),
        ],
    ),
    (
        "Scrape jobs",
        &[
            var("KEYMETER_JOB_WORKERS", "16", "job workers per instance (at most 1024)"),
            var("KEYMETER_JOB_LEASE_SECS", "30", "a running job's lease"),
            var("KEYMETER_JOB_RETENTION_DAYS", "30", "finished jobs are deleted this long after they end"),
            var("KEYMETER_JOB_POLL_MS", "1000", "idle workers look at the queue this often"),
            var("KEYMETER_SCRAPE_ALLOW", "", "host:port,... exempt from the SSRF guard (not in production)"),
            var("KEYMETER_PROXY_URL", "(direct)", "http(s)://[user:password@]host:port egress proxy"),
            var("KEYMETER_SCRAPE_USER_AGENT", "(keymeter/<version> (+scrape))", "User-Agent of scrape requests"),
            var("KEYMETER_SCRAPE_CONNECT_TIMEOUT_MS", "10000", "connect timeout of scrape requests"),
            var("KEYMETER_SCRAPE_MAX_BODY_BYTES", "5242880", "page bodies are cut beyond this"),
            var("KEYMETER_BREAKER_FAILURES", "5", "consecutive counted failures that open an origin's breaker"),
            var("KEYMETER_BREAKER_MIN_ACCOUNTS", "3", "distinct failing accounts an origin's shared breaker needs"),
            var("KEYMETER_BREAKER_TIMEOUT_FLOOR_MS", "5000", "a timeout counts against a site only from this long (at most 60000)"),
            var("KEYMETER_BREAKER_OPEN_SECS", "10", "first open period of a breaker"),
            var("KEYMETER_BREAKER_MAX_OPEN_SECS", "120", "longest open period (it doubles per failed probe)"),
            var("KEYMETER_WEBHOOK_SIGNING_KEY", "(a development key on loopback; none in production)", "32+ characters; derives every account's job-webhook secret"),
            var("KEYMETER_JOB_WEBHOOK_ATTEMPTS", "6", "tries per job webhook"),
            var("KEYMETER_JOB_WEBHOOK_RETRY_MS", "10000", "wait before the first retry"),
            var("KEYMETER_JOB_WEBHOOK_CONCURRENCY", "64", "job webhooks in flight per instance"),
            var("KEYMETER_JOB_WEBHOOK_PER_ACCOUNT", "8", "job webhooks in flight per instance for one account"),
            var("KEYMETER_JOB_WEBHOOK_PER_DESTINATION", "8", "job webhooks in flight per instance to one origin"),
        ],
    ),
    (
        "Account events",
        &[
            var("KEYMETER_EVENT_SIGNING_KEY", "(a development key on loopback; none in production)", "32+ characters; derives every webhook endpoint's signing secret"),
            var("KEYMETER_EVENT_WEBHOOK_RETRY_MS", "5000", "wait before an event delivery's first retry (doubling, for a day)"),
        ],
    ),
];

/// The variables as `--help` prints them, after the options.
pub fn help() -> String {
    let width = VARS
        .iter()
        .flat_map(|(_, vars)| vars.iter())
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::from(
        "Environment variables (read by every command; a bad value stops it with exit code 2, naming the variable):\n",
    );
    for (section, vars) in VARS {
        out.push_str(&format!("\n  {section}\n"));
        for v in *vars {
            let default = match v.default {
                "" => String::new(),
                d => format!(
                    " [default: {}]",
                    d.trim_start_matches('(').trim_end_matches(')')
                ),
            };
            out.push_str(&format!("    {:width$}  {}{default}\n", v.name, v.meaning));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::{BTreeSet, HashMap};

    use super::super::source::{vars, Source};
    use super::super::Config;
    use super::*;

    /// Variables read outside [`Config::from_source`] (by the tracing exporter itself).
    const READ_ELSEWHERE: &[&str] = &["OTEL_SERVICE_NAME"];

    fn names() -> BTreeSet<&'static str> {
        VARS.iter()
            .flat_map(|(_, vars)| vars.iter().map(|v| v.name))
            .collect()
    }

    /// Answers from a map and notes every name asked for.
    struct Recording(HashMap<String, String>, RefCell<BTreeSet<String>>);

    impl Source for Recording {
        fn get(&self, name: &str) -> Option<String> {
            self.1.borrow_mut().insert(name.to_owned());
            self.0.get(name).cloned()
        }
    }

    #[test]
    fn every_variable_the_parsers_read_is_listed_and_nothing_else() {
        let read = RefCell::new(BTreeSet::new());
        // Some variables are read only when another one asks for them.
        for pairs in [
            &[][..],
            &[
                ("KEYMETER_RATE_LIMIT_BACKEND", "redis"),
                ("REDIS_URL", "redis://127.0.0.1:6379/"),
                ("KEYMETER_METRICS_BIND", "127.0.0.1:9090"),
                ("KEYMETER_HTTP_WORKERS", "2"),
                ("KEYMETER_SCRAPE_ALLOW", "127.0.0.1:8081"),
            ][..],
        ] {
            let src = Recording(vars(pairs), RefCell::new(BTreeSet::new()));
            Config::from_source(&src).expect("parses");
            read.borrow_mut().extend(src.1.into_inner());
        }
        let mut listed = names();
        for n in READ_ELSEWHERE {
            assert!(listed.remove(n), "{n} is not listed");
        }
        let listed: BTreeSet<String> = listed.into_iter().map(str::to_owned).collect();
        assert_eq!(read.into_inner(), listed);
    }

    #[test]
    fn the_listed_defaults_are_the_parsers_defaults() {
        let defaults = format!("{:?}", Config::from_source(&vars(&[])).expect("parses"));
        for v in VARS.iter().flat_map(|(_, vars)| vars.iter()) {
            if v.default.is_empty()
                || v.default.starts_with('(')
                || READ_ELSEWHERE.contains(&v.name)
            {
                continue;
            }
            let c = Config::from_source(&vars(&[(v.name, v.default)]))
                .unwrap_or_else(|e| panic!("{}={}: {e}", v.name, v.default));
            assert_eq!(format!("{c:?}"), defaults, "{}={}", v.name, v.default);
        }
    }

    #[test]
    fn the_readme_and_env_example_name_every_variable() {
        let readme = include_str!("../../README.md");
        let example = include_str!("../../.env.example");
        for name in names() {
            assert!(readme.contains(&format!("`{name}`")), "README: {name}");
            assert!(
                example.contains(&format!("{name}=")),
                ".env.example: {name}"
            );
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let help = help();
        for name in names() {
            assert!(help.contains(name), "{name}");
        }
    }
}
