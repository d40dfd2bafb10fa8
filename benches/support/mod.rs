//! Helpers shared by the benchmarks: memory is read the same way everywhere, and with the
//! allocator the server runs with.

/// The server binary's allocator (src/main.rs), so in-process timings and memory match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Resident memory of this process, from `/proc/self/statm` (Linux; None elsewhere).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The process's peak resident set so far (`VmHWM`); not every bench including this module
/// reads it.
#[allow(dead_code)]
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs each of `specs` in a fresh process of this benchmark (`env_var=spec`), so that memory
/// freed by one measurement is not reused by the next. Only under `cargo bench`.
pub fn measure_in_fresh_processes(env_var: &str, specs: &[&str]) {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    for spec in specs {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .env(env_var, spec)
            .arg("--bench")
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("memory measurement {spec} failed");
        }
    }
}
