#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tlsgate_mgmt::fuzzing::config_toml(data));
