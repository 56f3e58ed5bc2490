//! Host tests of the root task's page arithmetic (`nul/root/src/pieces.rs`, which holds
//! the tests; the root itself is a bare-metal binary without a host test harness).

#[path = "../../nul/root/src/pieces.rs"]
#[allow(dead_code)]
mod pieces;
