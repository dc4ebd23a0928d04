//! How credits refusals become problems (status and [`ProblemType`](super::ProblemType)).
