//! Cache invalidation across instances: every instance LISTENs on one channel; a revocation,
//! rotation, tier change or suspension NOTIFYs in the transaction that makes it, so every
//! instance drops the entry within milliseconds of the commit. If the listening connection
//! drops, notifications may have been missed, so the whole cache is flushed when it
//! reconnects; the cache TTL is the backstop in between.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::cache::KeyCache;

pub const CHANNEL: &str = "keymeter_auth";

pub async fn run(cfg: tokio_postgres::Config, cache: KeyCache, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match listen_once(&cfg, &cache, &stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cache invalidation listener lost its connection");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_once(
    cfg: &tokio_postgres::Config,
    cache: &KeyCache,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut connection) = cfg.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let pump = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(msg) = stream.next().await {
            let end = msg.is_err();
            if tx.send(msg).is_err() || end {
                break;
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Anything may have changed while we were not listening.
    cache.invalidate_all();
    tracing::info!("cache invalidation listener connected");
    let result = loop {
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            msg = rx.recv() => match msg {
                Some(Ok(AsyncMessage::Notification(n))) => apply(cache, n.payload()).await,
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("connection closed")),
            }
        }
    };
    pump.abort();
    result
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
