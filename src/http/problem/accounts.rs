//! How accounts refusals become problems (status and [`ProblemType`](super::ProblemType)).
