//! Fuzz target: `shardcast::fuzzing::config_toml` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardcast::fuzzing::config_toml(data));
