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

/// The longest wait between two connection attempts. Short on purpose: while this
/// connection is down an instance hears no revocation, and only the flush at reconnect makes
/// it catch up, so every second of waiting here is a second a revoked key may still be
/// accepted (issue #19's fault run measured 3.7 s after a PostgreSQL restart with a 5 s cap
/// that never reset). One connection attempt per half second is nothing to a database.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

pub async fn run(pg: super::PgConnect, subs: Vec<Subscription>, stop: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let mut connected = false;
        match listen_once(&pg, &subs, &stop, &mut connected).await {
            Ok(()) => return,
            Err(e) => {
                // A connection that was up and then lost starts the backoff afresh: the
                // next outage must not inherit the waits of the last one.
                if connected {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LISTEN connection lost");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn listen_once(
    pg: &super::PgConnect,
    subs: &[Subscription],
    stop: &CancellationToken,
    connected: &mut bool,
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
    *connected = true;
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
