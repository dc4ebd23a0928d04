//! How jobs refusals become problems (status and [`ProblemType`](super::ProblemType)).
