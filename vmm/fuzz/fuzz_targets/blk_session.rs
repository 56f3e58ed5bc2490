//! libFuzzer entry for [`peregrine_vmm_fuzz::blk_session`]: see there what the input means.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| peregrine_vmm_fuzz::blk_session::run(data));
