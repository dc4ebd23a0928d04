//! How idempotency refusals become problems (status and [`ProblemType`](super::ProblemType)).
