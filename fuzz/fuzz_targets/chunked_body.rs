//! Fuzz target: `shardcast::fuzzing::chunked_body` (its oracle is documented there).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = shardcast::fuzzing::split_input(data);
    shardcast::fuzzing::chunked_body(stream, &cuts);
});
