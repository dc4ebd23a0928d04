//! One LISTEN connection per instance, shared by everything that reacts to another
//! instance's commits: the key cache (revocations, tier changes) and the job queue (new
//! jobs, finished jobs). NOTIFY is sent in the transaction that makes the change, so it
//! arrives only once the change is visible.
//!
//! A dropped connection may have missed notifications, so every subscriber's `on_connect`
//! runs after each (re)connect — the cache flushes itself, the queue wakes its workers and
//! waiting requests to look at the database again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// A channel and what to do with its messages. Handlers run on the listener's task: keep
/// them short (spawn anything slow).
pub struct Subscription {
    pub channel: &'static str,
    pub on_message: Arc<dyn Fn(&str) + Send + Sync>,
    pub on_connect: Arc<dyn Fn() + Send + Sync>,
}

pub async fn run(pg: super::PgConnect, subs: Vec<Subscription>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match listen_once(&pg, &subs, &stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LISTEN connection lost");
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
    pg: &super::PgConnect,
    subs: &[Subscription],
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut connection) = pg.connect().await?;
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
    let listen: String = subs
        .iter()
        .map(|s| format!("LISTEN {};", s.channel))
        .collect();
    client.batch_execute(&listen).await?;
    for s in subs {
        (s.on_connect)();
    }
    tracing::info!(
        channels = ?subs.iter().map(|s| s.channel).collect::<Vec<_>>(),
        "LISTEN connection ready"
    );
    let result = loop {
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            msg = rx.recv() => match msg {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Some(s) = subs.iter().find(|s| s.channel == n.channel()) {
                        (s.on_message)(n.payload());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("connection closed")),
            }
        }
    };
    pump.abort();
    result
}
