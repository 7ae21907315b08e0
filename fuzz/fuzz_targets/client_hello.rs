#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tlsgate_dataplane::fuzzing::client_hello(data));
