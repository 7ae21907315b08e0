#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tlsgate_dataplane::fuzzing::proxy_v2_round_trip(data));
