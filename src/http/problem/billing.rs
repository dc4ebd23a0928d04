//! How billing refusals become problems (status and [`ProblemType`](super::ProblemType)).
