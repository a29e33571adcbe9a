//! Fuzz target: `shardcast::fuzzing::token` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shardcast::fuzzing::token(data);
});
