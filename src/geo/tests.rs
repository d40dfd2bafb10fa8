//! Geo lookups against fixture databases written by `mmdb-writer`.

use super::*;
use std::net::IpAddr;

fn geo() -> Geo {
    Geo::new(
        Some(GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()),
        Some(GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::anonymous_db(), "anon").unwrap()),
        Some(GeoDatabase::from_bytes(DbRole::Asn, fixtures::asn_db(), "asn").unwrap()),
        1000,
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn country(lookup: &GeoLookup) -> Option<String> {
    lookup.record.facts.country.map(|c| c.to_string())
}

#[test]
fn reads_country_subdivisions_anonymizers_and_asn() {
    let geo = geo();
    let us = geo.lookup(ip("216.160.83.57")).unwrap();
    assert_eq!(country(&us).as_deref(), Some("US"));
    assert_eq!(us.record.facts.subdivisions[0].to_string(), "US-WA");
    assert_eq!(us.record.asn, Some(209));
    assert_eq!(
        us.network.to_string(),
        "216.160.83.56/29",
        "the most specific network wins"
    );

    let crimea = geo.lookup(ip("46.0.1.2")).unwrap();
    assert_eq!(crimea.record.facts.subdivisions[0].to_string(), "UA-43");

    let vpn = geo.lookup(ip("1.2.3.4")).unwrap();
    assert!(vpn.record.facts.anonymizer.vpn);
    assert_eq!(vpn.record.as_org.as_deref(), Some("Example VPN Ltd"));
    assert!(
        geo.lookup(ip("65.1.0.1"))
            .unwrap()
            .record
            .facts
            .anonymizer
            .tor
    );
    assert!(
        geo.lookup(ip("71.160.223.9"))
            .unwrap()
            .record
            .facts
            .anonymizer
            .hosting
    );
}

#[test]
fn empty_anonymous_record_reads_as_no_flags() {
    let found = geo().lookup(ip("8.8.8.8")).unwrap();
    assert_eq!(found.record.facts.anonymizer, Default::default());
    assert!(found.record.found);
    assert_eq!(found.record.facts.country, None);
}

#[test]
fn ipv4_mapped_ipv6_answers_exactly_as_ipv4() {
    let geo = geo();
    let mapped = geo.lookup(ip("::ffff:175.16.199.10")).unwrap();
    assert_eq!(mapped.ip, ip("175.16.199.10"));
    assert_eq!(country(&mapped).as_deref(), Some("CN"));
    // Uncached on both sides, so the cache cannot make them agree.
    let plain = geo.lookup_uncached(ip("175.16.199.10")).unwrap();
    assert_eq!(
        geo.lookup_uncached(ip("::ffff:175.16.199.10")).unwrap(),
        plain
    );
    assert_eq!((mapped.record.as_ref().clone(), mapped.network), plain);
}

#[test]
fn narrower_network_of_another_database_wins_across_families() {
    // The location database answers 6.1.0.5 from above the IPv4 subtree (an IPv6 network);
    // the anonymous database's /32 around 6.1.0.4 must still bound the cached answer.
    let geo = Geo::new(
        Some(
            GeoDatabase::from_bytes(DbRole::Location, fixtures::ipv6_only_city_db(), "v6")
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        Some(GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::anonymous_db(), "anon").unwrap()),
        None,
        1000,
    );
    let proxy = geo.lookup(ip("6.1.0.4")).unwrap();
    assert!(proxy.record.facts.anonymizer.residential_proxy);
    assert_eq!(proxy.network.to_string(), "6.1.0.4/32");
    let neighbour = geo.lookup(ip("6.1.0.5")).unwrap();
    assert!(
        !neighbour.record.facts.anonymizer.residential_proxy,
        "the /32 answer must not serve its neighbour"
    );
    assert_eq!(
        (neighbour.record.as_ref().clone(), neighbour.network),
        geo.lookup_uncached(ip("6.1.0.5")).unwrap()
    );
}

#[test]
fn ipv6_and_unknown_addresses() {
    let geo = geo();
    assert_eq!(
        country(&geo.lookup(ip("2a02:d2c0::1")).unwrap()).as_deref(),
        Some("IR")
    );
    let private = geo.lookup(ip("10.0.0.1")).unwrap();
    assert!(!private.record.found);
    assert_eq!(private.record.facts.country, None);
}

#[test]
fn flat_country_code_layout_is_read() {
    let geo = Geo::new(
        Some(
            GeoDatabase::from_bytes(DbRole::Location, fixtures::flat_country_db(), "flat").unwrap(),
        ),
        None,
        None,
        10,
    );
    assert_eq!(
        country(&geo.lookup(ip("5.1.2.3")).unwrap()).as_deref(),
        Some("IR")
    );
    assert_eq!(
        country(&geo.lookup(ip("::ffff:5.1.2.3")).unwrap()).as_deref(),
        Some("IR")
    );
}

#[test]
fn cache_serves_a_subnet_and_reload_changes_generation() {
    let db = |role, bytes, name| Some(GeoDatabase::from_bytes(role, bytes, name).unwrap());
    let geo = Geo::with_options(
        db(DbRole::Location, fixtures::city_db(), "city"),
        db(DbRole::Anonymous, fixtures::anonymous_db(), "anon"),
        db(DbRole::Asn, fixtures::asn_db(), "asn"),
        GeoOptions {
            compile: false,
            cache_capacity: 1000,
        },
    );
    geo.lookup(ip("175.16.199.10")).unwrap();
    geo.lookup(ip("175.16.199.200")).unwrap();
    assert_eq!(
        country(&geo.lookup(ip("216.160.83.57")).unwrap()).as_deref(),
        Some("US"),
        "cached before the swap"
    );
    assert_eq!(
        geo.cache_stats().hits,
        1,
        "second address in the same /24 hits"
    );
    assert_eq!(geo.cache_stats().misses, 2);
    geo.replace(
        DbRole::Location,
        Some(
            GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db_moved(), "moved").unwrap(),
        ),
    );
    assert_eq!(
        country(&geo.lookup(ip("216.160.83.57")).unwrap()).as_deref(),
        Some("IR"),
        "no stale cache answer"
    );
}

#[test]
fn refuses_corrupt_and_wrong_role_databases() {
    let mut truncated = fixtures::city_db();
    truncated.truncate(truncated.len() / 2);
    assert!(GeoDatabase::from_bytes(DbRole::Location, truncated, "t").is_err());
    assert!(GeoDatabase::from_bytes(DbRole::Location, b"not a database".to_vec(), "g").is_err());
    let err = GeoDatabase::from_bytes(DbRole::Location, fixtures::asn_db(), "asn-as-location")
        .unwrap_err();
    assert!(matches!(err, GeoError::WrongRole { .. }), "{err}");
    assert!(
        GeoDatabase::from_bytes(DbRole::Anonymous, fixtures::city_db(), "city-as-anon").is_err()
    );
}

#[test]
fn missing_location_database_is_an_error_not_a_panic() {
    let geo = Geo::new(None, None, None, 10);
    assert!(matches!(
        geo.lookup(ip("1.1.1.1")),
        Err(GeoError::NoLocationDatabase)
    ));
}

#[test]
fn cache_can_be_turned_off() {
    let geo = Geo::new(
        Some(GeoDatabase::from_bytes(DbRole::Location, fixtures::city_db(), "city").unwrap()),
        None,
        None,
        0,
    );
    for _ in 0..2 {
        assert_eq!(
            country(&geo.lookup(ip("175.16.199.10")).unwrap()).as_deref(),
            Some("CN")
        );
    }
    assert_eq!(geo.cache_stats(), CacheStats::default());
}

/// Every address a compiled table answers, it answers as the readers do (record and network):
/// the first and last address of every network of every database and their neighbours, for
/// the fixtures, the shipped whole-Internet database, and MaxMind's test databases when
/// REGIONGUARD_MAXMIND_TEST_DATA names them. Fails if the tables leave more than a few
/// addresses to the readers.
#[test]
fn compiled_tables_answer_as_the_readers_do() {
    let open = |role, bytes: Vec<u8>| GeoDatabase::from_bytes(role, bytes, "test").ok();
    // A location database, with or without the fixture Anonymous and ASN databases.
    let set = |name: &str, location: Vec<u8>, anonymous: bool, asn: bool| {
        let anonymous = anonymous.then(|| open(DbRole::Anonymous, fixtures::anonymous_db()));
        let asn = asn.then(|| open(DbRole::Asn, fixtures::asn_db()));
        (
            name.to_owned(),
            [
                open(DbRole::Location, location),
                anonymous.flatten(),
                asn.flatten(),
            ],
        )
    };
    let shipped = crate::app::EMBEDDED_LOCATION_DB.to_vec();
    let mut sets: Vec<(String, [Option<GeoDatabase>; 3])> = vec![
        set("fixtures", fixtures::city_db(), true, true),
        set("IPv6-only city", fixtures::ipv6_only_city_db(), true, false),
        set("flat country", fixtures::flat_country_db(), false, false),
        set("IPv4-only city", fixtures::ipv4_only_city_db(), true, true),
        set(
            "city without aliases",
            fixtures::unaliased_city_db(),
            true,
            false,
        ),
        set("shipped", shipped, false, false),
    ];
    if let Some(dir) = std::env::var_os("REGIONGUARD_MAXMIND_TEST_DATA") {
        let dir = std::path::PathBuf::from(dir);
        let file =
            |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for location in [
            "GeoIP2-City-Test.mmdb",
            "GeoIP2-Country-Test.mmdb",
            "GeoIP2-Enterprise-Test.mmdb",
            "GeoLite2-City-Test.mmdb",
        ] {
            sets.push((
                location.into(),
                [
                    open(DbRole::Location, file(location)),
                    open(DbRole::Anonymous, file("GeoIP2-Anonymous-IP-Test.mmdb")),
                    open(DbRole::Asn, file("GeoLite2-ASN-Test.mmdb")),
                ],
            ));
        }
    }
    for (name, [location, anonymous, asn]) in sets {
        assert!(location.is_some(), "{name}: the location database opens");
        let mut probes: Vec<IpAddr> = Vec::new();
        for db in [&location, &anonymous, &asn].into_iter().flatten() {
            let partition = db.partition().unwrap();
            // The shipped database has 1.3 million networks: every 9th is plenty.
            let step = (partition.v4.len() + partition.v6.len()) / 150_000 + 1;
            let v4 = partition.v4.iter().map(|c| (u128::from(c.start), c.prefix));
            let v6 = partition.v6.iter().map(|c| (c.start, c.prefix));
            let cells: [(Vec<(u128, u8)>, u32); 2] = [(v4.collect(), 32), (v6.collect(), 128)];
            for (cells, bits) in cells {
                for (start, prefix) in cells.into_iter().step_by(step) {
                    let size_bits = bits - u32::from(prefix);
                    let end = start | u128::MAX.checked_shr(128 - size_bits).unwrap_or(0);
                    let last = u128::MAX.checked_shr(128 - bits).unwrap_or(0);
                    for key in [
                        start.wrapping_sub(1) & last,
                        start,
                        end,
                        end.wrapping_add(1) & last,
                    ] {
                        probes.push(if bits == 32 {
                            IpAddr::from(std::net::Ipv4Addr::from(key as u32))
                        } else {
                            IpAddr::from(std::net::Ipv6Addr::from(key))
                        });
                    }
                }
            }
        }
        probes.extend(
            [
                "1.1.1.1",
                "2001:db8::1",
                "2002:102:304::1",
                "::1",
                "::1.2.3.4",
                "::ffff:81.2.69.160",
            ]
            .map(ip),
        );
        let geo = Geo::with_options(
            location,
            anonymous,
            asn,
            GeoOptions {
                compile: true,
                cache_capacity: 0,
            },
        );
        let compiled = geo.snapshot.load();
        let compiled = compiled.compiled.as_ref().expect("compiled");
        for probe in &probes {
            let probe = normalize(*probe);
            let read = geo
                .lookup_uncached(probe)
                .unwrap_or_else(|e| panic!("{name} {probe}: {e}"));
            // Through `lookup`: the tables, or for what they leave, the readers.
            let looked = geo.lookup(probe).unwrap();
            assert_eq!(
                (looked.record.as_ref().clone(), looked.network),
                read,
                "{name}: {probe}"
            );
            // The tables leave to the readers only `::/96` and the IPv4 aliases.
            if compiled.lookup(probe).is_none() {
                let left = match probe {
                    IpAddr::V6(v6) => {
                        let bits = u128::from(v6);
                        bits >> 32 == 0 || bits >> 96 == 0x2001_0000 || bits >> 112 == 0x2002
                    }
                    IpAddr::V4(_) => false,
                };
                assert!(left, "{name}: {probe} left to the readers");
            }
        }
    }
}

/// A file whose search tree shares nodes between branches (a walk of some 2^100 networks) is
/// refused at open, in a bounded walk, rather than walked until memory runs out.
#[test]
fn a_tree_that_shares_its_nodes_is_refused() {
    let started = std::time::Instant::now();
    let refused = GeoDatabase::from_bytes(DbRole::Location, fixtures::shared_nodes_db(), "shared");
    let error = refused.expect_err("refused").to_string();
    assert!(error.contains("more networks than nodes"), "{error}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
