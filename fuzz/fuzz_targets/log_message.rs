//! Fuzz target: `shardcast::fuzzing::log_message` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shardcast::fuzzing::log_message(data);
});
