//! Host tests of the benchmark figures' arithmetic in the root task
//! (`nul/root/src/scenario/bench_calc.rs`, which holds the tests; the root itself is a
//! bare-metal binary without a host test harness).

#[path = "../../nul/root/src/scenario/bench_calc.rs"]
#[allow(dead_code)]
mod bench_calc;
