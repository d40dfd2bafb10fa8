//! Criterion benchmarks of the request path: the pure classifier, geo lookups cached and
//! uncached (the baseline, measured in the same run), and a whole decision through the engine.
//!
//! Run with `cargo bench --bench decide`; quote medians and the cached/uncached ratio.

#[path = "../tests/support/fixtures.rs"]
mod fixtures;
#[path = "support/requests.rs"]
mod requests;
mod support;

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group};
use prost::Message;
use regionguard::app::EMBEDDED_LOCATION_DB;
use regionguard::classify::{
    AccountFacts, AnonymizerFlags, Facts, Flow, HintFacts, IpFacts, classify,
};
use regionguard::engine::{ClassifyInput, Engine};
use regionguard::geo::{DbRole, Geo, GeoDatabase, GeoOptions};
use regionguard::grpc::pb;
use regionguard::policy::embedded_policy;
use regionguard::region::{CountryCode, RegionCode};

/// 1024 addresses spread over real address space (a fixed LCG, so every run sees the same).
fn addresses() -> Vec<IpAddr> {
    let mut x: u32 = 0x2545_f491;
    (0..1024)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            IpAddr::from(std::net::Ipv4Addr::from(x | 0x0100_0000))
        })
        .collect()
}

/// The shipped whole-Internet country database, as served by default (compiled).
fn whole_internet() -> Geo {
    whole_internet_with(COMPILED)
}

/// The default: compiled tables (the cache serves only what they leave to the readers).
const COMPILED: GeoOptions = GeoOptions {
    compile: true,
    cache_capacity: 100_000,
};
/// Today's alternative: the readers behind the prefix cache.
const CACHED: GeoOptions = GeoOptions {
    compile: false,
    cache_capacity: 100_000,
};
/// The readers alone.
const READERS: GeoOptions = GeoOptions {
    compile: false,
    cache_capacity: 0,
};

fn whole_internet_with(options: GeoOptions) -> Geo {
    let db = GeoDatabase::from_bytes(DbRole::Location, EMBEDDED_LOCATION_DB.to_vec(), "embedded")
        .unwrap();
    Geo::with_options(Some(db), None, None, options)
}

/// Opens a set of databases with the given options (`None`: not available here).
type Opener = fn(GeoOptions) -> Option<Geo>;

/// The fixture City, Anonymous and ASN databases.
fn fixture_three(options: GeoOptions) -> Geo {
    let open = |role, bytes| GeoDatabase::from_bytes(role, bytes, "fixture").unwrap();
    Geo::with_options(
        Some(open(DbRole::Location, fixtures::city_db())),
        Some(open(DbRole::Anonymous, fixtures::anonymous_db())),
        Some(open(DbRole::Asn, fixtures::asn_db())),
        options,
    )
}

/// MaxMind's City and Anonymous-IP test databases, when REGIONGUARD_MAXMIND_TEST_DATA names
/// them (City records carry names in eight languages, as production City data does).
fn maxmind_city(options: GeoOptions) -> Option<Geo> {
    let dir = std::env::var_os("REGIONGUARD_MAXMIND_TEST_DATA")?;
    let open =
        |role, name: &str| GeoDatabase::open(role, &std::path::Path::new(&dir).join(name)).unwrap();
    Some(Geo::with_options(
        Some(open(DbRole::Location, "GeoIP2-City-Test.mmdb")),
        Some(open(DbRole::Anonymous, "GeoIP2-Anonymous-IP-Test.mmdb")),
        None,
        options,
    ))
}

fn bench_classify(c: &mut Criterion) {
    let policy = embedded_policy().unwrap();
    let country = |s| CountryCode::parse(s).ok();
    let clean = IpFacts {
        country: country("DE"),
        ..Default::default()
    };
    let busy = IpFacts {
        country: country("UA"),
        subdivisions: vec![RegionCode::parse("UA-43").unwrap()],
        anonymizer: AnonymizerFlags {
            vpn: true,
            hosting: true,
            ..Default::default()
        },
    };
    let account = AccountFacts {
        billing_country: country("FR"),
        declared_country: country("DE"),
        created_at_unix: Some(1_700_000_000),
        ..Default::default()
    };
    let hints = HintFacts {
        language_regions: vec![country("DE").unwrap()],
        timezone: Some("Europe/Berlin".into()),
    };
    let mut group = c.benchmark_group("classify");
    group.bench_function("allow_no_reasons", |b| {
        let facts = Facts {
            flow: Flow::ApiRequest,
            now_unix: 1_790_000_000,
            ip: &clean,
            account: &AccountFacts::default(),
            hints: &HintFacts::default(),
            usage: None,
            overrides: &[],
        };
        b.iter(|| classify(black_box(&facts), &policy))
    });
    group.bench_function("deny_many_reasons", |b| {
        let facts = Facts {
            flow: Flow::Signup,
            now_unix: 1_790_000_000,
            ip: &busy,
            account: &account,
            hints: &hints,
            usage: None,
            overrides: &[],
        };
        b.iter(|| classify(black_box(&facts), &policy))
    });
    group.finish();
}

/// Hot lookups (1,024 addresses, or MaxMind's five): through the compiled tables, through the
/// prefix cache in front of the readers, and the readers alone, each on the same databases.
fn bench_geo(c: &mut Criterion) {
    let ips = addresses();
    let maxmind_ips: Vec<IpAddr> = [
        "81.2.69.142",
        "89.160.20.115",
        "216.160.83.57",
        "175.16.199.10",
        "2.125.160.217",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut group = c.benchmark_group("geo");
    let mut cases: Vec<(&str, Opener, &Vec<IpAddr>)> = vec![
        (
            "whole_internet_country",
            |o| Some(whole_internet_with(o)),
            &ips,
        ),
        ("fixture_city_anon_asn", |o| Some(fixture_three(o)), &ips),
    ];
    if std::env::var_os("REGIONGUARD_MAXMIND_TEST_DATA").is_some() {
        cases.push(("maxmind_city_anon", maxmind_city, &maxmind_ips));
    }
    for (name, open, ips) in cases {
        let (compiled, cached) = (open(COMPILED).unwrap(), open(CACHED).unwrap());
        group.bench_function(format!("{name}/uncached"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                cached.lookup_uncached(black_box(ips[i])).unwrap()
            })
        });
        group.bench_function(format!("{name}/cached"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                cached.lookup(black_box(ips[i])).unwrap()
            })
        });
        group.bench_function(format!("{name}/compiled"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                compiled.lookup(black_box(ips[i])).unwrap()
            })
        });
    }
    group.finish();
}

/// A whole decision (lookup, classify, decision id) with the IP's network cached, and with no
/// cache at all.
fn bench_engine(c: &mut Criterion) {
    let ips = addresses();
    for (name, geo) in [
        ("engine/classify_whole_internet", whole_internet()),
        (
            "engine/classify_whole_internet_cached",
            whole_internet_with(CACHED),
        ),
        (
            "engine/classify_whole_internet_uncached",
            whole_internet_with(READERS),
        ),
    ] {
        let engine = Engine::new(embedded_policy().unwrap(), geo, None);
        c.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                let input = ClassifyInput::for_ip(ips[i]);
                engine
                    .classify_now(black_box(&input), std::time::SystemTime::now())
                    .unwrap()
            })
        });
    }
    // What the Classify handler does around the transport: decode the request bytes, convert,
    // decide, convert back, encode the response. The wire bench's gap to echo, without h2.
    let engine = Engine::new(embedded_policy().unwrap(), whole_internet(), None);
    let requests: Vec<Vec<u8>> = ips
        .iter()
        .map(|ip| {
            pb::ClassifyRequest {
                ip: ip.to_string(),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let response_bytes: usize = ips
        .iter()
        .map(|ip| {
            let outcome = engine
                .classify_now(&ClassifyInput::for_ip(*ip), std::time::SystemTime::now())
                .unwrap();
            pb::ClassifyResponse::from(outcome).encoded_len()
        })
        .sum();
    println!(
        "sizes: Classify request {:.0} B, response {:.0} B on average over {} addresses",
        requests.iter().map(Vec::len).sum::<usize>() as f64 / requests.len() as f64,
        response_bytes as f64 / ips.len() as f64,
        ips.len()
    );
    c.bench_function("engine/classify_rpc_body_uncached", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % requests.len();
            let request = pb::ClassifyRequest::decode(black_box(&requests[i][..])).unwrap();
            let input = ClassifyInput::try_from(&request).unwrap();
            let outcome = engine
                .classify_now(&input, std::time::SystemTime::now())
                .unwrap();
            pb::ClassifyResponse::from(outcome).encode_to_vec()
        })
    });
}

/// Issue 16's (b) and (c) in process: a whole decision (lookup, usage facts, overrides,
/// classify, decision id) for an API request of an account with usage history, and for a
/// signup with a full account; then the same with the request decoded from its bytes and the
/// response encoded, as the Classify handler does around the transport.
fn bench_realistic(c: &mut Criterion) {
    let history = std::sync::Arc::new(regionguard::usage::UsageAggregator::new(256 << 20));
    let engine =
        Engine::new(embedded_policy().unwrap(), whole_internet(), None).with_usage(history);
    let now = requests::now_secs();
    for e in requests::history(now * 1000) {
        let text = |v: &str| (!v.is_empty()).then(|| std::sync::Arc::from(v));
        let event = regionguard::usage::UsageEvent {
            account_id: e.account_id.as_str().into(),
            ip: e.ip.parse().unwrap(),
            timestamp: e.timestamp_unix_ms / 1000,
            api_key_id: text(&e.api_key_id),
            requests: e.request_count,
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            payment_fingerprint: text(&e.payment_fingerprint),
            device_id: None,
            prompt_fingerprint: None,
            organization_domain: None,
        };
        assert!(engine.record_usage(&event));
    }
    for (name, make) in [
        (
            "api_request_with_history",
            requests::api_request as fn(u32) -> pb::ClassifyRequest,
        ),
        ("signup_full_account", requests::signup_request),
    ] {
        let bodies: Vec<Vec<u8>> = (0..requests::ACCOUNTS)
            .map(|n| make(n).encode_to_vec())
            .collect();
        let inputs: Vec<ClassifyInput> = (0..requests::ACCOUNTS)
            .map(|n| ClassifyInput::try_from(&make(n)).unwrap())
            .collect();
        c.bench_function(&format!("engine/{name}"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % inputs.len();
                engine
                    .classify_now(black_box(&inputs[i]), std::time::SystemTime::now())
                    .unwrap()
            })
        });
        // Every call in a second of its own: the account's facts read off its state each time,
        // not from the last read of the same second (what a hot account gets).
        c.bench_function(&format!("engine/{name}_each_second_new"), |b| {
            let mut n = 0u64;
            b.iter(|| {
                n += 1;
                let i = (n % inputs.len() as u64) as usize;
                let second = now as u64 + n % 3600;
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(second);
                engine.classify_now(black_box(&inputs[i]), at).unwrap()
            })
        });
        c.bench_function(&format!("engine/{name}_rpc_body"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % bodies.len();
                let request = pb::ClassifyRequest::decode(black_box(&bodies[i][..])).unwrap();
                let input = ClassifyInput::try_from(&request).unwrap();
                let outcome = engine
                    .classify_now(&input, std::time::SystemTime::now())
                    .unwrap();
                pb::ClassifyResponse::from(outcome).encode_to_vec()
            })
        });
    }
}

/// The lookup ceiling: the three databases read directly (tree walk + decode of the fields we
/// use), against `Geo::lookup_uncached`, which also combines the answers.
fn bench_raw_lookups(c: &mut Criterion) {
    let location = GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap();
    let anonymous =
        GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::anonymous_db(), "anon").unwrap();
    let asn = GeoDatabase::from_bytes(DbRole::Asn, fixtures::asn_db(), "asn").unwrap();
    let ips = addresses();
    c.bench_function("geo/fixture_raw_three_lookups", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ips.len();
            let ip = black_box(ips[i]);
            (
                location.location(ip).unwrap(),
                anonymous.anonymizer(ip).unwrap(),
                asn.asn(ip).unwrap(),
            )
        })
    });
}

/// A policy with about `n` list entries (assigned subdivisions, in code order, besides the
/// embedded policy's own).
fn policy_with_entries(n: usize) -> regionguard::policy::Policy {
    let base = regionguard::policy::EMBEDDED_POLICY;
    let extra: Vec<String> = RegionCode::assigned_subdivisions()
        .iter()
        .filter(|code| !base.contains(&format!("\"{code}\"")))
        .take(n.saturating_sub(17))
        .map(|code| format!("  \"{code}\","))
        .collect();
    let text = base.replacen("  \"CU\",", &format!("{}\n  \"CU\",", extra.join("\n")), 1);
    regionguard::policy::parse_policy(&text, "bench").unwrap()
}

fn bench_policy_size(c: &mut Criterion) {
    let ip = IpFacts {
        country: CountryCode::parse("UA").ok(),
        subdivisions: vec![RegionCode::parse("UA-30").unwrap()],
        ..Default::default()
    };
    let account = AccountFacts {
        billing_country: CountryCode::parse("FR").ok(),
        ..Default::default()
    };
    let hints = HintFacts::default();
    let mut group = c.benchmark_group("classify_by_policy_entries");
    for n in [17, 100, 5_000] {
        let policy = policy_with_entries(n);
        group.bench_function(format!("{n}"), |b| {
            let facts = Facts {
                flow: Flow::ApiRequest,
                now_unix: 1_790_000_000,
                ip: &ip,
                account: &account,
                hints: &hints,
                usage: None,
                overrides: &[],
            };
            b.iter(|| classify(black_box(&facts), &policy))
        });
    }
    group.finish();
}

/// Lookups spread uniformly over 1k, 100k and 1M networks of the shipped database (one /24
/// bucket each): through the prefix cache holding them all, through the compiled tables, and
/// the readers alone.
fn bench_cache_size(c: &mut Criterion) {
    let bucket = |k: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0100_0000 + k * 256));
    let compiled = whole_internet_with(COMPILED);
    let readers = whole_internet_with(READERS);
    for n in [1_000u32, 100_000, 1_000_000] {
        let cached = whole_internet_with(GeoOptions {
            compile: false,
            cache_capacity: u64::from(n) * 2,
        });
        for k in 0..n {
            cached.lookup(bucket(k)).unwrap();
        }
        for (group, geo) in [
            ("geo_cached_by_entries", &cached),
            ("geo_compiled_by_entries", &compiled),
            ("geo_uncached_by_entries", &readers),
        ] {
            let mut group = c.benchmark_group(group);
            group.bench_function(format!("{n}"), |b| {
                let mut k = 0;
                b.iter(|| {
                    k = (k + 7919) % n;
                    geo.lookup(black_box(bucket(k))).unwrap()
                })
            });
            group.finish();
        }
    }
}

/// What compiling costs, for the shipped database and MaxMind's City test database: the walk at
/// open, the compile, the tables' bytes per network, and the resident growth of it all.
fn report_compiled() {
    let mut cases: Vec<(&str, Opener)> =
        vec![("shipped country database", |o| Some(whole_internet_with(o)))];
    if std::env::var_os("REGIONGUARD_MAXMIND_TEST_DATA").is_some() {
        cases.push(("MaxMind City + Anonymous-IP test databases", maxmind_city));
    }
    for (name, open) in cases {
        let (before, started) = (support::rss_bytes(), std::time::Instant::now());
        let geo = open(COMPILED).unwrap();
        let elapsed = started.elapsed();
        let mib = |b: Option<u64>| {
            b.map_or("n/a".to_owned(), |g| {
                format!("{:.1} MiB", g as f64 / 1048576.0)
            })
        };
        let grown = support::rss_bytes()
            .zip(before)
            .map(|(after, before)| after.saturating_sub(before));
        let peak = support::peak_rss_bytes()
            .zip(before)
            .map(|(peak, before)| peak.saturating_sub(before));
        let stats = geo.compiled_stats().expect("compiled");
        println!(
            "compiled: {name}: {} networks, opened and compiled in {} ms: {} + {} ranges, {} records, {:.1} MiB = {:.1} B per network; resident growth {} (peak {})",
            stats.networks,
            elapsed.as_millis(),
            stats.ranges_v4,
            stats.ranges_v6,
            stats.records,
            stats.bytes as f64 / 1048576.0,
            stats.bytes as f64 / stats.networks as f64,
            mib(grown),
            mib(peak),
        );
        drop(geo);
        let started = std::time::Instant::now();
        let uncompiled = open(READERS).unwrap();
        println!(
            "compiled: {name}: opened without compiling in {} ms",
            started.elapsed().as_millis()
        );
        drop(uncompiled);
    }
}

criterion_group!(
    benches,
    bench_classify,
    bench_geo,
    bench_raw_lookups,
    bench_policy_size,
    bench_cache_size,
    bench_engine,
    bench_realistic
);

/// Resident bytes per cache entry: `n` distinct /24 buckets looked up through a cache that holds
/// them all, the growth divided by `n` (the record, its `Arc`, moka's entry and index).
fn report_cache_memory(n: u32) {
    let geo = whole_internet_with(GeoOptions {
        compile: false,
        cache_capacity: u64::from(n) * 2,
    });
    let before = support::rss_bytes();
    for k in 0..n {
        geo.lookup(IpAddr::from(std::net::Ipv4Addr::from(
            0x0100_0000 + k * 256,
        )))
        .unwrap();
    }
    let grown = support::rss_bytes()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before));
    let stats = geo.cache_stats();
    println!(
        "memory: prefix cache, {n} buckets looked up ({} misses): resident growth {}, {} per entry; size_of GeoRecord {} B",
        stats.misses,
        grown.map_or("n/a".to_owned(), |g| format!(
            "{:.1} MiB",
            g as f64 / 1048576.0
        )),
        grown.map_or("n/a".to_owned(), |g| format!(
            "{:.0} B",
            g as f64 / f64::from(n)
        )),
        std::mem::size_of::<regionguard::geo::GeoRecord>(),
    );
}

fn main() {
    if let Ok(n) = std::env::var("REGIONGUARD_BENCH_CACHE_MEMORY") {
        report_cache_memory(n.parse().expect("a number of cache entries"));
        return;
    }
    support::measure_in_fresh_processes("REGIONGUARD_BENCH_CACHE_MEMORY", &["100000", "1000000"]);
    report_compiled();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
