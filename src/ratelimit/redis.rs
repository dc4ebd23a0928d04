//! The shared per-key limit: GCRA in Redis, one round trip per check (a Lua script run
//! atomically by the server), so several keymeter instances enforce one limit together.
//!
//! The script reads Redis's own clock (`TIME`), so instances with skewed clocks still agree.
//! State is one integer per key — its theoretical arrival time — with a TTL of when it would
//! be back to full, so idle keys vanish by themselves and memory stays bounded.

use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use super::tiers::Tier;
use super::Decision;

const GCRA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if now < allow_at then
  return {0, 0, math.floor(allow_at - now), math.floor(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, math.floor((now - allow_at) / interval), 0, math.floor(new_tat - now)}
"#;

pub struct RedisLimiter {
    conn: RwLock<Option<ConnectionManager>>,
    script: Script,
    timeout: Duration,
}

fn ceil_secs_micros(us: i64) -> u64 {
    (us.max(0) as u64).div_ceil(1_000_000)
}

impl RedisLimiter {
    pub fn new(timeout: Duration) -> RedisLimiter {
        RedisLimiter {
            conn: RwLock::new(None),
            script: Script::new(GCRA),
            timeout,
        }
    }

    /// Connects, and keeps trying in the background while Redis is unreachable (the
    /// in-memory fallback, or refusals, cover the meantime). Once connected, the connection
    /// manager reconnects by itself.
    pub async fn run_connector(&self, url: SecretString, stop: CancellationToken) {
        let client = match redis::Client::open(url.expose_secret()) {
            Ok(c) => c,
            Err(_) => {
                tracing::error!("REDIS_URL is not a valid Redis URL; using the fallback limiter");
                return;
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let mut backoff = Duration::from_millis(250);
        loop {
            tracing::debug!("connecting to Redis for rate limits");
            match client
                .get_connection_manager_with_config(config.clone())
                .await
            {
                Ok(cm) => {
                    if let Ok(mut slot) = self.conn.write() {
                        *slot = Some(cm);
                    }
                    tracing::info!("rate limits shared through Redis");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Redis unreachable for rate limits; retrying");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Whether Redis answers a `PING` within the limit check's own timeout — the same bound
    /// under which a check would count Redis as unavailable, so readiness and the checks agree.
    pub async fn ping(&self) -> bool {
        let Some(mut conn) = self.conn.read().ok().and_then(|c| c.clone()) else {
            return false;
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(_)))
    }

    /// `Err` when Redis cannot answer in time; the caller decides between the fallback and
    /// refusing.
    pub async fn check(&self, key_id: &str, tier: &Tier) -> Result<Decision, String> {
        let Some(mut conn) = self.conn.read().ok().and_then(|c| c.clone()) else {
            return Err("not connected".into());
        };
        let interval_us = 60_000_000i64 / i64::from(tier.requests_per_minute.max(1));
        let mut inv = self.script.prepare_invoke();
        inv.key(format!("km:rl:{}:{}", tier.name, key_id))
            .arg(interval_us)
            .arg(tier.burst.max(1));
        let call = inv.invoke_async::<Vec<i64>>(&mut conn);
        let out = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) if v.len() == 4 => v,
            Ok(Ok(_)) => return Err("unexpected script reply".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let allowed = out[0] == 1;
        Ok(Decision {
            allowed,
            policy: tier.name.clone(),
            limit: tier.requests_per_minute,
            remaining: out[1].clamp(0, i64::from(u32::MAX)) as u32,
            reset_secs: ceil_secs_micros(out[3]),
            retry_after_secs: if allowed {
                0
            } else {
                ceil_secs_micros(out[2]).max(1)
            },
        })
    }
}
