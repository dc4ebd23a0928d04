//! Batched account reads for the hottest authenticated route (`GET /v1/account`).
//!
//! Under load, many requests read an account row at the same moment, each paying a pooled
//! connection, a round trip and a query of its own. Here concurrent reads share one query:
//! the first request of a quiet moment runs its read at once; reads that arrive while it is
//! in flight wait for it to finish and then go together as one
//! `SELECT … WHERE id = ANY($1)`. Every read is still issued after its request arrived, so
//! a balance is never older than the request asking for it — nothing is cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{account, Account, COLUMNS};
use crate::error::ApiError;

type Reply = oneshot::Sender<Result<Option<Account>, ApiError>>;

pub struct AccountReads {
    pending: Mutex<Vec<(Uuid, Reply)>>,
    running: AtomicBool,
    /// Where batches run: the service's own runtime, which outlives the HTTP workers' (see
    /// `credits::coalesce`).
    runtime: Handle,
}

impl AccountReads {
    pub fn new(runtime: Handle) -> Self {
        Self {
            pending: Mutex::default(),
            running: AtomicBool::new(false),
            runtime,
        }
    }

    /// The account as it is now (read after this call began).
    pub async fn get(self: &Arc<Self>, db: &Pool, id: Uuid) -> Result<Option<Account>, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, reply));
        if !self.running.swap(true, Ordering::AcqRel) {
            // Its own task: a client hanging up must not strand the reads batched with it.
            let (me, db) = (self.clone(), db.clone());
            self.runtime.spawn(async move { me.drain(db).await });
        }
        answer
            .await
            .map_err(|_| ApiError::Internal(anyhow::anyhow!("account read dropped")))?
    }

    async fn drain(&self, db: Pool) {
        loop {
            let batch =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if batch.is_empty() {
                self.running.store(false, Ordering::Release);
                // A read may have queued between the take and the store: if nobody else took
                // the lead since, keep leading.
                let more = !self.pending.lock().map(|p| p.is_empty()).unwrap_or(true);
                if more && !self.running.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            }
            let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
            match read(&db, &ids).await {
                Ok(mut found) => {
                    for (id, reply) in batch {
                        let _ = reply.send(Ok(found.get(&id).cloned()));
                    }
                    found.clear();
                }
                Err(e) => {
                    let unavailable = matches!(e, ApiError::DatabaseUnavailable);
                    for (_, reply) in batch {
                        let _ = reply.send(Err(if unavailable {
                            ApiError::DatabaseUnavailable
                        } else {
                            ApiError::Internal(anyhow::anyhow!("batched account read failed"))
                        }));
                    }
                }
            }
        }
    }
}

async fn read(db: &Pool, ids: &[Uuid]) -> Result<HashMap<Uuid, Account>, ApiError> {
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
