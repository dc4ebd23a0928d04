//! How jobs refusals become problems (status and [`ProblemType`](super::ProblemType)).
//!
//! The jobs domain says what happened ([`QueueError::QueueFull`], [`JobFailed`]…) and carries
//! the facts a client needs; here each gets its `type`, its extension members and its
//! `Retry-After`.

use super::{ApiError, ProblemType};
use crate::jobs::wait::Failure;
use crate::jobs::{InvalidJob, JobFailed, QueueError, SubmitError, WaitError, WebhookUrlError};

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::JobNotFound | QueueError::AccountNotFound => {
                ApiError::NotFound(e.to_string())
            }
            QueueError::QueueFull {
                max_queued_jobs, ..
            } => ApiError::problem(ProblemType::QueueFull, e.to_string())
                .with("max_queued_jobs", max_queued_jobs)
                .retry_after(1),
            QueueError::JobNotCancellable { ref status } => {
                let status = status.clone();
                let err = ApiError::problem(ProblemType::JobNotCancellable, e.to_string());
                match status {
                    Some(s) => err.with("job_status", s),
                    None => err,
                }
            }
            QueueError::Invariant(what) => ApiError::Internal(anyhow::anyhow!(what)),
            QueueError::Credits(e) => e.into(),
            QueueError::Db(e) => e.into(),
        }
    }
}

impl From<WebhookUrlError> for ApiError {
    fn from(e: WebhookUrlError) -> Self {
        match e {
            WebhookUrlError::NotAllowed(_) => {
                ApiError::problem(ProblemType::UrlNotAllowed, e.to_string())
                    .with("field", "webhook_url")
            }
            WebhookUrlError::Off | WebhookUrlError::TooLong | WebhookUrlError::Malformed(_) => {
                ApiError::validation("webhook_url", e.to_string())
            }
        }
    }
}

impl From<InvalidJob> for ApiError {
    fn from(e: InvalidJob) -> Self {
        ApiError::validation(e.field(), e.to_string())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(e) => e.into(),
            SubmitError::UrlNotAllowed(refused) => {
                ApiError::problem(ProblemType::UrlNotAllowed, refused.to_string())
                    .with("field", "url")
            }
            SubmitError::Webhook(e) => e.into(),
            SubmitError::BreakerOpen(refused) => {
                ApiError::problem(ProblemType::UpstreamUnavailable, refused.to_string())
                    .with("breaker", refused.kind.as_str())
                    .with("scope", refused.scope.as_str())
                    .retry_after(refused.retry_after.as_secs().max(1))
            }
            SubmitError::Queue(e) => e.into(),
            SubmitError::Db(e) => e.into(),
        }
    }
}

impl From<WaitError> for ApiError {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Read(e) => e.into(),
            // The job is queued and durable: when the database went away meanwhile, say which
            // job it was, so the client can look it up instead of guessing whether it ran.
            WaitError::LostTrack { job_id, source } => match ApiError::from(source) {
                ApiError::DatabaseUnavailable => ApiError::problem(
                    ProblemType::DatabaseUnavailable,
                    format!(
                        "The job was queued but its result could not be read; look it up with GET /v1/jobs/{job_id}."
                    ),
                )
                .with("job_id", job_id.to_string())
                .retry_after(1),
                other => other,
            },
        }
    }
}

impl From<Box<JobFailed>> for ApiError {
    fn from(e: Box<JobFailed>) -> Self {
        let kind = match e.failure {
            Failure::TimedOut => ProblemType::JobTimeout,
            Failure::CircuitOpen => ProblemType::UpstreamUnavailable,
            Failure::UrlNotAllowed => ProblemType::UrlNotAllowed,
            Failure::Cancelled => ProblemType::JobCancelled,
            Failure::UpstreamFailed => ProblemType::UpstreamFailed,
        };
        let mut err = ApiError::problem(kind, e.detail)
            .with("job_id", e.job_id.to_string())
            .with("reason", e.reason)
            .with("refunded", e.refunded)
            .with("cost", e.cost);
        if let Some(s) = e.upstream_status {
            err = err.with("upstream_status", s);
        }
        if kind == ProblemType::UpstreamUnavailable {
            err = err.retry_after(1);
        }
        err
    }
}
