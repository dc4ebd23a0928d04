//! The shared limits: GCRA in Redis, one round trip per request (a Lua script run atomically
//! by the server), so several keymeter instances enforce one limit together.
//!
//! One script checks every limit of a request — the account's tier limit and the key's own —
//! and spends from them only if all allow it, so a refusal by one never spends another's
//! budget. Both keys carry the account id as a hash tag (`{…}`), so they live in one slot and
//! the script stays valid on a Redis Cluster.
//!
//! The script reads Redis's own clock (`TIME`), so instances with skewed clocks still agree.
//! State is one integer per limit — its theoretical arrival time — with a TTL of when it would
//! be back to full, so idle accounts and keys vanish by themselves and memory stays bounded.

use std::sync::RwLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use super::{binding, key_quota, Decision, Subject, KEY_POLICY};
use crate::tiers::Tier;

/// KEYS[i] with ARGV[2i-1] (emission interval, µs) and ARGV[2i] (burst). Returns
/// `allowed` then, per limit, `allowed, remaining, retry_after_us, reset_us`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local all = 1
local out = {0}
local tats = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - interval * burst
  tats[i] = new_tat
  if now < allow_at then
    all = 0
    table.insert(out, 0)
    table.insert(out, 0)
    table.insert(out, math.floor(allow_at - now))
    table.insert(out, math.floor(tat - now))
  else
    table.insert(out, 1)
    table.insert(out, math.floor((now - allow_at) / interval))
    table.insert(out, 0)
    table.insert(out, math.floor(new_tat - now))
  end
end
if all == 1 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.floor((tats[i] - now) / 1000) + 1)
  end
end
out[1] = all
return out
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
    /// refusing. `Ok(None)` when nothing limits the request.
    pub async fn check<'t>(
        &self,
        who: Subject<'_>,
        tier: &'t Tier,
    ) -> Result<Option<Decision<'t>>, String> {
        // (Redis key, policy, requests per minute, burst) of each limit that applies.
        let mut limits: Vec<(String, &'t str, u32, u32)> = Vec::with_capacity(2);
        if !tier.unlimited {
            limits.push((
                format!("km:rl:{{{}}}:tier:{}", who.account_id, tier.name),
                &tier.name,
                tier.requests_per_minute,
                tier.burst,
            ));
        }
        if let Some(rl) = who.key_rate_limit {
            let (rpm, burst) = key_quota(rl, tier);
            limits.push((
                format!(
                    "km:rl:{{{}}}:key:{}:{rpm}:{burst}",
                    who.account_id, who.key_id
                ),
                KEY_POLICY,
                rpm,
                burst,
            ));
        }
        if limits.is_empty() {
            return Ok(None);
        }
        let Some(mut conn) = self.conn.read().ok().and_then(|c| c.clone()) else {
            return Err("not connected".into());
        };
        let mut inv = self.script.prepare_invoke();
        for (key, _, rpm, burst) in &limits {
            inv.key(key)
                .arg(60_000_000i64 / i64::from((*rpm).max(1)))
                .arg((*burst).max(1));
        }
        let call = inv.invoke_async::<Vec<i64>>(&mut conn);
        let out = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) if v.len() == 1 + 4 * limits.len() => v,
            Ok(Ok(_)) => return Err("unexpected script reply".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let decisions =
            limits
                .iter()
                .zip(out[1..].chunks_exact(4))
                .map(|((_, policy, rpm, _), r)| {
                    let allowed = r[0] == 1;
                    Decision {
                        allowed,
                        policy,
                        limit: *rpm,
                        remaining: r[1].clamp(0, i64::from(u32::MAX)) as u32,
                        reset_secs: ceil_secs_micros(r[3]),
                        retry_after_secs: if allowed {
                            0
                        } else {
                            ceil_secs_micros(r[2]).max(1)
                        },
                        rendered: None,
                    }
                });
        Ok(decisions.reduce(binding))
    }
}
