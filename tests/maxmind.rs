//! The geo loader against real files: MaxMind's official test databases (when
//! REGIONGUARD_MAXMIND_TEST_DATA points at them) and the shipped whole-Internet default.

mod support;

use std::net::IpAddr;

use regionguard::app::EMBEDDED_LOCATION_DB;
use regionguard::geo::{DbRole, Geo, GeoDatabase};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn corrupt_official_databases_are_refused_cleanly() {
    let Some(dir) = support::maxmind_dir() else {
        eprintln!(
            "{} not set: MaxMind corrupt-file checks not run",
            support::MAXMIND_ENV
        );
        return;
    };
    for name in [
        "GeoIP2-City-Test-Broken-Double-Format.mmdb",
        "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
        "MaxMind-DB-test-broken-pointers-24.mmdb",
        "MaxMind-DB-test-broken-search-tree-24.mmdb",
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let result = GeoDatabase::from_bytes(DbRole::Location, bytes, name);
        assert!(result.is_err(), "{name} must be refused");
        support::record(format_args!("{name}: refused: {}", result.unwrap_err()));
    }
}

#[test]
fn official_databases_load_in_their_roles() {
    let Some(dir) = support::maxmind_dir() else {
        eprintln!(
            "{} not set: MaxMind role checks not run",
            support::MAXMIND_ENV
        );
        return;
    };
    let open = |role, name: &str| {
        GeoDatabase::open(role, &dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let country = open(DbRole::Location, "GeoIP2-Country-Test.mmdb");
    let plus = open(DbRole::Anonymous, "GeoIP-Anonymous-Plus-Test.mmdb");
    let geo = Geo::new(
        Some(country),
        Some(plus),
        Some(open(DbRole::Asn, "GeoLite2-ASN-Test.mmdb")),
        100,
    );
    assert!(
        geo.lookup(ip("1.2.0.1"))
            .unwrap()
            .record
            .facts
            .anonymizer
            .vpn,
        "Anonymous Plus VPN flag"
    );
    let telstra = geo.lookup(ip("1.128.0.1")).unwrap();
    assert_eq!(telstra.record.asn, Some(1221));
    let anon = open(DbRole::Anonymous, "GeoIP2-Anonymous-IP-Test.mmdb");
    let geo = Geo::new(
        Some(open(DbRole::Location, "GeoLite2-City-Test.mmdb")),
        Some(anon),
        None,
        100,
    );
    let empty = geo.lookup(ip("8.8.8.8")).unwrap();
    assert_eq!(
        empty.record.facts.anonymizer,
        Default::default(),
        "an empty record reads as no flags"
    );
    for (role, name) in [
        (DbRole::Location, "GeoLite2-ASN-Test.mmdb"),
        (DbRole::Asn, "GeoIP2-City-Test.mmdb"),
    ] {
        assert!(
            GeoDatabase::open(role, &dir.join(name)).is_err(),
            "{name} is not a {role:?} database"
        );
    }
}

#[test]
fn shipped_default_database_answers_real_addresses() {
    let db = GeoDatabase::from_bytes(DbRole::Location, EMBEDDED_LOCATION_DB.to_vec(), "embedded")
        .unwrap();
    let geo = Geo::new(Some(db), None, None, 100);
    let country = |s: &str| {
        geo.lookup(ip(s))
            .unwrap()
            .record
            .facts
            .country
            .map(|c| c.to_string())
    };
    // Well-known public resolvers and registry-assigned blocks.
    assert_eq!(country("8.8.8.8").as_deref(), Some("US"));
    assert_eq!(
        country("::ffff:8.8.8.8").as_deref(),
        Some("US"),
        "IPv4-mapped answers as IPv4"
    );
    assert_eq!(country("2001:4860:4860::8888").as_deref(), Some("US"));
    assert_eq!(country("10.0.0.1"), None, "private space is unknown");
}

/// The released binary answers `lookup` alike with the databases compiled (the default) and
/// with `compile_databases = false` (the readers behind the cache), for MaxMind's City,
/// Anonymous-IP and ASN test databases: countries, subdivisions, flags, ASNs and networks.
#[test]
fn lookups_answer_alike_compiled_or_read() {
    let Some(dir) = support::maxmind_dir() else {
        eprintln!(
            "{} not set: compiled-or-read lookups not run",
            support::MAXMIND_ENV
        );
        return;
    };
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "compile_databases = false\n").unwrap();
    let lookup = |ip: &str, read: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_regionguard"));
        command
            .arg("lookup")
            .arg("--location-db")
            .arg(dir.join("GeoIP2-City-Test.mmdb"))
            .arg("--anonymous-db")
            .arg(dir.join("GeoIP2-Anonymous-IP-Test.mmdb"))
            .arg("--asn-db")
            .arg(dir.join("GeoLite2-ASN-Test.mmdb"))
            .env_remove("REGIONGUARD_CONFIG");
        if read {
            command.arg("--config").arg(config.path());
        }
        let out = command.arg(ip).output().unwrap();
        assert!(
            out.status.success(),
            "{ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json
    };
    let mut found = 0;
    for ip in [
        "81.2.69.142",
        "89.160.20.115",
        "216.160.83.57",
        "175.16.199.10",
        "2.125.160.217",
        "1.2.0.1",
        "2001:218::1",
        "2a02:d2c0::1",
        "::1.2.3.4",
        "2002:102:304::1",
        "10.0.0.1",
    ] {
        let (compiled, read) = (lookup(ip, false), lookup(ip, true));
        assert_eq!(compiled, read, "{ip}");
        found += usize::from(compiled["found"] == serde_json::Value::Bool(true));
    }
    assert!(
        found >= 6,
        "only {found} addresses found: the check would prove little"
    );
}
