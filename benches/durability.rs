//! Must-record waits over the wire (#12): signup Classify, 64 in flight, against three real
//! servers in alternating rounds of one run: no store, the SQLite store with every decision
//! recorded asynchronously (`must_record = []`), and the store as shipped (signup decisions
//! answered only once their row is committed, group-committed by the writer).
//!
//! `cargo bench --bench durability` (release). Servers on core 0, the load generator on core 1
//! when `taskset` exists. Under `cargo test` it runs a short smoke round of each.

#[path = "support/load.rs"]
mod load;

use std::time::Duration;

use regionguard::grpc::pb::{self, classifier_client::ClassifierClient};

/// A signup as a signup flow sends it: a new account with its countries and creation time,
/// browser hints, from an address spread over real address space (a fixed LCG).
fn signup(worker: usize, i: u64) -> pb::ClassifyRequest {
    let n = (worker as u64) << 40 | i;
    let x = (n as u32)
        .wrapping_mul(1_664_525)
        .wrapping_add(1_013_904_223)
        ^ (worker as u32) << 24;
    pb::ClassifyRequest {
        ip: std::net::Ipv4Addr::from(x | 0x0100_0000).to_string(),
        flow: pb::Flow::Signup.into(),
        account: Some(pb::Account {
            account_id: format!("new-{worker}-{i}"),
            billing_country: "DE".into(),
            phone_country: "DE".into(),
            declared_country: "DE".into(),
            created_at_unix: 1_790_000_000,
            ..Default::default()
        }),
        hints: Some(pb::ClientHints {
            accept_language: "de-DE,de;q=0.9,en;q=0.8".into(),
            timezone: "Europe/Berlin".into(),
            user_agent: "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/140.0".into(),
        }),
        request_id: format!("req-{worker}-{i}"),
        ..Default::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let benching = load::pin_load_generator();
    let (rounds, duration) = if benching {
        (5, Duration::from_secs(2))
    } else {
        (1, Duration::from_millis(200))
    };
    let dir = tempfile::tempdir().unwrap();
    let store = |name: &str, extra: &str| {
        format!(
            "[usage]\nenabled = false\n[store]\ndata_dir = {:?}\n{extra}",
            dir.path().join(name).display().to_string()
        )
    };
    let servers = [
        (
            "no store",
            load::start(dir.path(), "off", "[usage]\nenabled = false").await,
        ),
        (
            "store, recorded asynchronously",
            load::start(dir.path(), "async", &store("async", "must_record = []")).await,
        ),
        (
            "store, must-record waits (as shipped)",
            load::start(dir.path(), "wait", &store("wait", "")).await,
        ),
    ];
    let mut results: Vec<Vec<(load::Round, f64)>> = vec![Vec::new(); servers.len()];
    for r in 0..rounds {
        for k in 0..servers.len() {
            let i = (k + r) % servers.len();
            let (_, server) = &servers[i];
            let client = ClassifierClient::new(server.channel.clone());
            let cpu = load::cpu_seconds(server.child.id());
            let got = load::round(64, duration, move |worker, n| {
                let mut client = client.clone();
                async move { client.classify(signup(worker, n)).await.is_ok() }
            })
            .await;
            let cpu_us =
                (load::cpu_seconds(server.child.id()) - cpu) * 1e6 / got.calls.max(1) as f64;
            results[i].push((got, cpu_us));
        }
    }
    if !benching {
        println!(
            "(smoke run under cargo test: debug build, short runs; the figures are not measurements)"
        );
    }
    println!(
        "\n| signup Classify, 64 in flight | calls/s | p50 µs | p99 µs | server CPU µs/call | errors |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut errors = 0;
    for ((name, _), rounds) in servers.iter().zip(&results) {
        let of = |f: fn(&(load::Round, f64)) -> f64| load::median(rounds.iter().map(f).collect());
        let e: u64 = rounds.iter().map(|(r, _)| r.errors).sum();
        errors += e;
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} | {e} |",
            of(|r| r.0.rate),
            of(|r| r.0.p50_us),
            of(|r| r.0.p99_us),
            of(|r| r.1)
        );
    }
    let ratio = |a: usize, b: usize| {
        load::median(
            results[a]
                .iter()
                .zip(&results[b])
                .map(|((x, _), (y, _))| x.rate / y.rate)
                .collect(),
        )
    };
    println!(
        "must-record / no store throughput: {:.2}; must-record / asynchronous store: {:.2} (medians of per-round ratios)",
        ratio(2, 0),
        ratio(2, 1)
    );
    let stored = load::metric(&servers[2].1, "regionguard_audit_recorded_total");
    let unrecorded = load::metric(&servers[2].1, "regionguard_audit_unrecorded_total");
    let commits = load::metric(&servers[2].1, "regionguard_audit_commits_total");
    println!(
        "must-record server: {stored} rows committed in {commits} transactions ({:.1} a commit), {unrecorded} decisions not given",
        stored / commits.max(1.0)
    );
    // What a row costs on disk: the database file with its WAL (the WAL is cut back after
    // checkpoints, so this is the table, its indexes and the pages' free space).
    for (i, name) in [(1, "async"), (2, "wait")] {
        let rows = load::metric(&servers[i].1, "regionguard_audit_recorded_total");
        let dropped = load::metric(&servers[i].1, "regionguard_audit_dropped_total");
        if dropped > 0.0 {
            println!("{name} store: {dropped} rows left out under overflow");
        }
        let db = regionguard::store::sqlite::db_path(&dir.path().join(name));
        let bytes: u64 = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut path = db.clone().into_os_string();
                path.push(suffix);
                std::fs::metadata(path).ok().map(|m| m.len())
            })
            .sum();
        println!(
            "{name} store: {:.0} bytes on disk per row ({rows} rows)",
            bytes as f64 / rows.max(1.0)
        );
    }
    assert_eq!(errors, 0);
}
