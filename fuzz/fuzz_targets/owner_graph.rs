#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| regionguard_fuzz::owner_graph(data));
