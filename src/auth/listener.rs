//! Cache invalidation across instances: a revocation, rotation, tier change or suspension
//! NOTIFYs in the transaction that makes it, and every instance drops the entry within
//! milliseconds of the commit (the shared LISTEN connection is in `db::listen`). If that
//! connection drops, notifications may have been missed, so the whole cache is flushed when
//! it reconnects; the cache TTL is the backstop in between.

use std::sync::Arc;

use super::cache::KeyCache;
use crate::db::listen::Subscription;

pub const CHANNEL: &str = "keymeter_auth";

pub fn subscription(cache: KeyCache) -> Subscription {
    let on_connect = {
        let cache = cache.clone();
        Arc::new(move || cache.invalidate_all())
    };
    Subscription {
        channel: CHANNEL,
        on_message: Arc::new(move |payload: &str| {
            let (cache, payload) = (cache.clone(), payload.to_owned());
            tokio::spawn(async move { apply(&cache, &payload).await });
        }),
        on_connect,
    }
}

async fn apply(cache: &KeyCache, payload: &str) {
    if let Some(id) = payload.strip_prefix("key:") {
        cache.invalidate_key(id).await;
    } else if let Some(id) = payload.strip_prefix("account:") {
        match id.parse() {
            Ok(uuid) => cache.invalidate_account(uuid),
            Err(_) => cache.invalidate_all(),
        }
    } else {
        cache.invalidate_all();
    }
}
