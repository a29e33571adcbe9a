//! Fuzz target: `shardcast::fuzzing::tenants_yaml` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shardcast::fuzzing::tenants_yaml(data));
