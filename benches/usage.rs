//! Usage ingest: events/s through the aggregator (and through the engine, geo lookup included),
//! and memory per tracked account, weighted (what the ceiling counts) and as resident memory.
//!
//! Run with `cargo bench --bench usage`.

#[path = "../tests/support/fixtures.rs"]
mod fixtures;
mod support;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use regionguard::engine::Engine;
use regionguard::geo::{DbRole, Geo, GeoDatabase};
use regionguard::policy::embedded_policy;
use regionguard::region::CountryCode;
use regionguard::usage::{EventLocation, UsageAggregator, UsageEvent};

const NOW: i64 = 1_790_000_000;

fn event(account: &Arc<str>, ip: IpAddr, t: i64) -> UsageEvent {
    UsageEvent {
        account_id: account.clone(),
        ip,
        timestamp: t,
        api_key_id: Some("key".into()),
        requests: 1,
        input_tokens: 500,
        output_tokens: 200,
        payment_fingerprint: Some(format!("card-{}", t % 1000).into()),
        device_id: None,
        prompt_fingerprint: None,
        organization_domain: None,
    }
}

/// Prints bytes per account for `n` accounts shaped by `events_per_account`, under a ceiling of
/// `ceiling_mb`.
fn report_memory(n: u32, events_per_account: i64, ceiling_mb: u64) {
    let usage = UsageAggregator::new(ceiling_mb << 20);
    let location = EventLocation {
        country: CountryCode::parse("DE").ok(),
        ..Default::default()
    };
    let before = support::rss_bytes();
    for i in 0..n {
        let account: Arc<str> = format!("account-{i}").into();
        let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i * 256));
        for step in 0..events_per_account {
            usage.record(&event(&account, ip, NOW - 86_400 + step * 300), &location);
        }
    }
    let stats = usage.stats();
    let rss = support::rss_bytes()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before));
    let held = stats.accounts.max(1) as f64;
    println!(
        "memory: {n} accounts x {events_per_account} events (5 min apart), ceiling {ceiling_mb} MiB: {} accounts held, weighted {:.1} MiB ({:.0} B/account incl. network keys), resident growth {}",
        stats.accounts,
        stats.bytes as f64 / f64::from(1 << 20),
        stats.bytes as f64 / held,
        rss.map_or("n/a".to_owned(), |r| format!(
            "{:.1} MiB ({:.0} B/account)",
            r as f64 / f64::from(1 << 20),
            r as f64 / held
        ))
    );
}

fn bench_ingest(c: &mut Criterion) {
    let accounts: Vec<Arc<str>> = (0..10_000).map(|i| format!("account-{i}").into()).collect();
    let location = EventLocation {
        country: CountryCode::parse("DE").ok(),
        ..Default::default()
    };
    let usage = UsageAggregator::new(1 << 30);
    let mut group = c.benchmark_group("usage");
    group.throughput(Throughput::Elements(1));
    group.bench_function("aggregator_record", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + (i as u32 % 5000) * 256));
            usage.record(
                black_box(&event(
                    &accounts[i % accounts.len()],
                    ip,
                    NOW + (i as i64 / 1000),
                )),
                &location,
            )
        })
    });
    let geo = Geo::new(
        Some(GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()),
        Some(GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::anonymous_db(), "anon").unwrap()),
        None,
        100_000,
    );
    let engine = Engine::new(embedded_policy().unwrap(), geo, None)
        .with_usage(std::sync::Arc::new(UsageAggregator::new(1 << 30)));
    group.bench_function("engine_record_usage_with_geo", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i += 1;
            let ip = IpAddr::V4(Ipv4Addr::from(0x1800_0000 + (i as u32 % 5000) * 256));
            engine.record_usage(black_box(&event(
                &accounts[i % accounts.len()],
                ip,
                NOW + (i as i64 / 1000),
            )))
        })
    });
    group.finish();
}

fn main() {
    // Each memory measurement runs in a fresh process, so freed memory is not reused.
    if let Ok(spec) = std::env::var("REGIONGUARD_BENCH_MEMORY") {
        let parts: Vec<u64> = spec
            .split(',')
            .map(|p| p.parse().expect("n,events,ceiling_mb"))
            .collect();
        report_memory(parts[0] as u32, parts[1] as i64, parts[2]);
        return;
    }
    // Bytes per account (no eviction), then a million accounts under a 256 MiB ceiling.
    support::measure_in_fresh_processes(
        "REGIONGUARD_BENCH_MEMORY",
        &["100000,1,65536", "10000,288,65536", "1000000,1,256"],
    );
    let mut criterion = Criterion::default().configure_from_args();
    bench_ingest(&mut criterion);
    criterion.final_summary();
}
