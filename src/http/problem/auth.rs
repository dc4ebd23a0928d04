//! How auth refusals become problems (status and [`ProblemType`](super::ProblemType)).
