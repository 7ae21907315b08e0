#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tlsgate_dataplane::fuzzing::conn_core(data));
