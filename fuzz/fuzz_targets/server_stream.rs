//! Fuzz target: a live in-process server fed one connection's bytes, whole
//! and split at fuzzer-chosen points (`shardcast::fuzzing::server_stream`).
//! Input: byte 0 = number of cuts (≤ 8), then 2 bytes per cut (offsets),
//! then the stream.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = shardcast::fuzzing::split_input(data);
    shardcast::fuzzing::server_stream(stream, &cuts);
});
