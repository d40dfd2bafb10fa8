//! Criterion benchmarks of the request path: the pure classifier, geo lookups cached and
//! uncached (the baseline, measured in the same run), and a whole decision through the engine.
//!
//! Run with `cargo bench --bench decide`; quote medians and the cached/uncached ratio.

#[path = "../tests/support/fixtures.rs"]
mod fixtures;

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use regionguard::app::EMBEDDED_LOCATION_DB;
use regionguard::classify::{
    AccountFacts, AnonymizerFlags, Facts, Flow, HintFacts, IpFacts, classify,
};
use regionguard::engine::{ClassifyInput, Engine};
use regionguard::geo::{DbRole, Geo, GeoDatabase};
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

/// The shipped whole-Internet country database, cached.
fn whole_internet() -> Geo {
    let db = GeoDatabase::from_bytes(DbRole::Location, EMBEDDED_LOCATION_DB.to_vec(), "embedded")
        .unwrap();
    Geo::new(Some(db), None, None, 100_000)
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

fn bench_geo(c: &mut Criterion) {
    let world = whole_internet();
    let city = Geo::new(
        Some(GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()),
        Some(GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::anonymous_db(), "anon").unwrap()),
        Some(GeoDatabase::from_bytes(DbRole::Asn, fixtures::asn_db(), "asn").unwrap()),
        100_000,
    );
    // MaxMind's City test records carry names in eight languages, as production City data does.
    let maxmind = std::env::var_os("REGIONGUARD_MAXMIND_TEST_DATA").map(|dir| {
        let open = |role, name: &str| {
            GeoDatabase::open(role, &std::path::Path::new(&dir).join(name)).unwrap()
        };
        Geo::new(
            Some(open(DbRole::Location, "GeoIP2-City-Test.mmdb")),
            Some(open(DbRole::Anonymous, "GeoIP2-Anonymous-IP-Test.mmdb")),
            None,
            100_000,
        )
    });
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
    let mut cases = vec![
        ("whole_internet_country", &world, &ips),
        ("fixture_city_anon_asn", &city, &ips),
    ];
    if let Some(maxmind) = &maxmind {
        cases.push(("maxmind_city_anon", maxmind, &maxmind_ips));
    }
    for (name, geo, ips) in cases {
        group.bench_function(format!("{name}/uncached"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                geo.lookup_uncached(black_box(ips[i])).unwrap()
            })
        });
        group.bench_function(format!("{name}/cached"), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ips.len();
                geo.lookup(black_box(ips[i])).unwrap()
            })
        });
    }
    group.finish();
}

fn bench_engine(c: &mut Criterion) {
    let geo = whole_internet();
    let engine = Engine::new(embedded_policy().unwrap(), geo, None);
    let ips = addresses();
    c.bench_function("engine/classify_whole_internet", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % ips.len();
            let input = ClassifyInput::for_ip(ips[i]);
            engine.classify(black_box(&input)).unwrap()
        })
    });
}

criterion_group!(benches, bench_classify, bench_geo, bench_engine);
criterion_main!(benches);
