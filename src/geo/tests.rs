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
        us.record.network.to_string(),
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
    assert_eq!(*mapped.record, plain);
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
    assert_eq!(proxy.record.network.to_string(), "6.1.0.4/32");
    let neighbour = geo.lookup(ip("6.1.0.5")).unwrap();
    assert!(
        !neighbour.record.facts.anonymizer.residential_proxy,
        "the /32 answer must not serve its neighbour"
    );
    assert_eq!(
        *neighbour.record,
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
    let geo = geo();
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
