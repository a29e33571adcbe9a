//! Fuzz target: `shardcast::fuzzing::query` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardcast::fuzzing::query(data));
