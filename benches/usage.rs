//! Usage ingest: events/s through the aggregator (and through the engine, geo lookup included),
//! and memory per tracked account, weighted (what the ceiling counts) and as resident memory.
//! Fleets: the cost of one event in the fleet graph and of one account's fleet facts, memory per
//! linked account (counted and resident), and a million linked accounts under a ceiling.
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
use regionguard::policy::FleetRules;
use regionguard::policy::embedded_policy;
use regionguard::region::CountryCode;
use regionguard::usage::fleet::FleetGraph;
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

/// Resident growth `rss`, in MiB and per held account.
fn resident(rss: Option<u64>, held: f64) -> String {
    rss.map_or("n/a".to_owned(), |r| {
        format!(
            "{:.1} MiB ({:.0} B/account)",
            r as f64 / f64::from(1 << 20),
            r as f64 / held
        )
    })
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
        resident(rss, held)
    );
}

/// Account `i` of fleets of 30 chained two by two: it shares a card with one neighbour and a
/// device with the other (so no value is shared by more than 2, yet each 30 are one fleet), one
/// /24 of its own, at `t`.
fn linked_event(i: u32, t: i64) -> UsageEvent {
    let (fleet, j) = (i / 30, i % 30);
    UsageEvent {
        account_id: format!("account-{i}").into(),
        ip: IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i * 256)),
        timestamp: t,
        api_key_id: None,
        requests: 1,
        input_tokens: 500,
        output_tokens: 200,
        payment_fingerprint: Some(format!("card-{fleet}-{}", j / 2).into()),
        device_id: Some(format!("device-{fleet}-{}", j.div_ceil(2)).into()),
        prompt_fingerprint: None,
        organization_domain: None,
    }
}

/// Prints the fleet graph's bytes per linked account for `n` accounts (counted, and resident),
/// the graph alone with `ceiling_mb` for it; then, in the same process, nothing else.
fn report_fleet_memory(n: u32, ceiling_mb: u64) {
    let mut graph = FleetGraph::new(ceiling_mb << 20, FleetRules::default());
    let before = support::rss_bytes();
    for i in 0..n {
        graph.record(&linked_event(i, NOW + i64::from(i) / 1000));
    }
    let stats = graph.stats();
    let rss = support::rss_bytes()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before));
    let held = stats.accounts.max(1) as f64;
    let (facts, _) = graph.facts("account-0", NOW + i64::from(n) / 1000);
    println!(
        "fleet memory: {n} linked accounts (fleets of 30), ceiling {ceiling_mb} MiB: {} accounts and {} link values held, {} refused; counted {:.1} MiB ({:.0} B/account), resident growth {}; account-0's fleet has {} members",
        stats.accounts,
        stats.links,
        stats.refused,
        graph.bytes() as f64 / f64::from(1 << 20),
        graph.bytes() as f64 / held,
        resident(rss, held),
        facts.map_or(0, |f| f.size),
    );
}

/// A million linked accounts through the whole in-process usage history (usage maps and fleet
/// graph) under `ceiling_mb`: resident growth against the ceiling.
fn report_linked_under_ceiling(n: u32, ceiling_mb: u64) {
    let usage = UsageAggregator::new(ceiling_mb << 20);
    let location = EventLocation {
        country: CountryCode::parse("DE").ok(),
        ..Default::default()
    };
    let before = support::rss_bytes();
    for i in 0..n {
        usage.record(&linked_event(i, NOW + i64::from(i) / 1000), &location);
    }
    let rss = support::rss_bytes()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before));
    let stats = usage.stats();
    println!(
        "usage with fleets: {n} linked accounts, ceiling {ceiling_mb} MiB: {} accounts held, resident growth {} ({})",
        stats.accounts,
        rss.map_or("n/a".to_owned(), |r| format!(
            "{:.1} MiB",
            r as f64 / f64::from(1 << 20)
        )),
        match rss {
            Some(r) if r <= ceiling_mb << 20 => "under the ceiling",
            Some(_) => "OVER THE CEILING",
            None => "not measured",
        }
    );
}

fn bench_fleets(c: &mut Criterion) {
    let mut group = c.benchmark_group("fleets");
    group.throughput(Throughput::Elements(1));
    // 100k linked accounts in the graph; then events for them (the steady state) and the
    // facts a decision reads.
    let n = 100_000u32;
    let mut graph = FleetGraph::new(1 << 30, FleetRules::default());
    for i in 0..n {
        graph.record(&linked_event(i, NOW));
    }
    let events: Vec<UsageEvent> = (0..n).map(|i| linked_event(i, NOW + 1)).collect();
    group.bench_function("graph_record_linked_event", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % events.len();
            graph.record(black_box(&events[i]))
        })
    });
    let accounts: Vec<String> = (0..n).map(|i| format!("account-{i}")).collect();
    group.bench_function("graph_facts", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % accounts.len();
            black_box(graph.facts(&accounts[i], NOW + 2))
        })
    });
    group.bench_function("graph_rebuild_100k", |b| {
        b.iter(|| graph.rebuild(black_box(NOW + 3)))
    });
    group.finish();
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
        if let Some(rest) = spec.strip_prefix("fleet,") {
            let (n, mb) = rest.split_once(',').expect("fleet,n,ceiling_mb");
            report_fleet_memory(n.parse().unwrap(), mb.parse().unwrap());
            return;
        }
        if let Some(rest) = spec.strip_prefix("linked,") {
            let (n, mb) = rest.split_once(',').expect("linked,n,ceiling_mb");
            report_linked_under_ceiling(n.parse().unwrap(), mb.parse().unwrap());
            return;
        }
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
        &[
            "100000,1,65536",
            "10000,288,65536",
            "1000000,1,256",
            "fleet,100000,65536",
            "fleet,1000000,65536",
            "fleet,1000000,32",
            "linked,1000000,256",
        ],
    );
    let mut criterion = Criterion::default().configure_from_args();
    bench_ingest(&mut criterion);
    bench_fleets(&mut criterion);
    criterion.final_summary();
}
