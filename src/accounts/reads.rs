//! Batched account reads for the hottest authenticated route (`GET /v1/account`).
//!
//! Under load, many requests read an account row at the same moment, each paying a pooled
//! connection, a round trip and a query of its own. Here concurrent reads share one query:
//! the first request of a quiet moment runs its read at once; reads that arrive while it is
//! in flight wait for it to finish and then go together as one
//! `SELECT … WHERE id = ANY($1)`. Every read is still issued after its request arrived, so
//! a balance is never older than the request asking for it — nothing is cached.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{account, Account, COLUMNS};
use crate::db;
use crate::db::batch::Batcher;

type Reply = oneshot::Sender<Result<Option<Account>, db::Error>>;

pub struct AccountReads {
    queue: Arc<Batcher<(Uuid, Reply)>>,
}

impl AccountReads {
    /// `runtime`: the service's runtime, where the batches run (see `db::batch`).
    pub fn new(runtime: Handle) -> Self {
        Self {
            queue: Arc::new(Batcher::new(runtime)),
        }
    }

    /// The account as it is now (read after this call began).
    pub async fn get(&self, db: &Pool, id: Uuid) -> Result<Option<Account>, db::Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .push((id, reply), |queue| drain(queue, db.clone()));
        answer
            .await
            .map_err(|_| db::Error::Other(anyhow::anyhow!("account read dropped")))?
    }
}

async fn drain(queue: Arc<Batcher<(Uuid, Reply)>>, db: Pool) {
    while let Some(batch) = queue.next_batch(usize::MAX) {
        let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        match read(&db, &ids).await {
            Ok(mut found) => {
                for (id, reply) in batch {
                    let _ = reply.send(Ok(found.get(&id).cloned()));
                }
                found.clear();
            }
            Err(e) => {
                // Every waiter gets its own copy: an outage stays an outage (a retry may
                // help), anything else is this read's failure (logged once per waiter).
                for (_, reply) in batch {
                    let _ = reply.send(Err(match &e {
                        db::Error::Unavailable(why) => db::Error::Unavailable(why.clone()),
                        db::Error::Other(_) => {
                            db::Error::Other(anyhow::anyhow!("batched account read failed"))
                        }
                    }));
                }
            }
        }
    }
}

async fn read(db: &Pool, ids: &[Uuid]) -> Result<HashMap<Uuid, Account>, db::Error> {
    let client = db.get().await?;
    let rows = if let [id] = ids {
        let stmt = client
            .prepare_cached(&format!("SELECT {COLUMNS} FROM accounts WHERE id = $1"))
            .await?;
        client.query(&stmt, &[id]).await?
    } else {
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM accounts WHERE id = ANY($1)"
            ))
            .await?;
        client.query(&stmt, &[&ids]).await?
    };
    Ok(rows
        .iter()
        .map(|r| {
            let a = account(r);
            (a.id, a)
        })
        .collect())
}
