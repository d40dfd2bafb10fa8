//! Small MaxMind-format databases written with `mmdb-writer`, so the repository tests itself.
//!
//! The networks mirror MaxMind's public test databases where they can (same addresses for the
//! sanctioned, unsupported, VPN, Tor and hosting cases), and add locations MaxMind's files lack
//! (a Crimean subdivision, a located VPN). Shared by unit tests (via `#[path]`) and `tests/`.
#![allow(dead_code)]

use mmdb_writer::{Value, Writer};

fn iso(code: &str) -> Value {
    Value::map([
        ("iso_code", Value::from(code)),
        ("names", Value::map([("en", Value::from(code))])),
    ])
}

/// Typed as MaxMind types them (accuracy_radius is a uint16), so the reader is held to it.
fn city(country: &str, subdivisions: &[&str], registered: &str) -> Value {
    Value::map([
        ("country", iso(country)),
        ("registered_country", iso(registered)),
        (
            "subdivisions",
            subdivisions.iter().map(|s| iso(s)).collect::<Value>(),
        ),
        (
            "location",
            Value::map([("accuracy_radius", Value::from(100u16))]),
        ),
    ])
}

fn flags(names: &[&str]) -> Value {
    names
        .iter()
        .map(|n| ((*n).to_owned(), Value::from(true)))
        .collect()
}

fn asn(number: u32, org: &str) -> Value {
    Value::map([
        ("autonomous_system_number", Value::from(number)),
        ("autonomous_system_organization", Value::from(org)),
    ])
}

fn country_code(code: &str) -> Value {
    Value::map([("country_code", Value::from(code))])
}

fn write(database_type: &str, entries: &[(&str, Value)]) -> Vec<u8> {
    let writer = Writer::builder(database_type)
        .description(&[("en", "regionguard test fixture")])
        .build();
    write_with(writer, entries)
}

fn write_with(mut writer: Writer, entries: &[(&str, Value)]) -> Vec<u8> {
    for (network, value) in entries {
        let network: ipnet::IpNet = network.parse().expect("fixture network");
        writer
            .insert_value(network, value.clone())
            .expect("fixture insert");
    }
    writer.to_bytes().expect("fixture write")
}

/// A City-shaped location database.
pub fn city_db() -> Vec<u8> {
    write(
        "RegionGuard-Test-City",
        &[
            ("216.160.83.56/29", city("US", &["WA"], "US")),
            ("89.160.20.112/28", city("SE", &["E"], "SE")),
            ("5.1.0.0/16", city("IR", &[], "IR")),
            ("2a02:d2c0::/29", city("IR", &[], "IR")),
            ("175.16.199.0/24", city("CN", &["22"], "CN")),
            ("46.0.0.0/16", city("UA", &["43"], "UA")),
            ("46.1.0.0/16", city("UA", &["30"], "UA")),
            ("81.2.69.142/31", city("GB", &["ENG"], "US")),
            ("81.2.69.160/27", city("GB", &["ENG"], "GB")),
            ("1.2.0.0/16", city("DE", &["BE"], "DE")),
            ("65.0.0.0/13", city("NL", &[], "NL")),
            ("71.160.223.0/24", city("US", &["CA"], "US")),
            ("2001:db8:1::/48", city("DE", &[], "DE")),
            // Ordinary residential users in usage simulations: one /24 each.
            ("24.0.0.0/8", city("US", &["NY"], "US")),
        ],
    )
}

/// The same world with every located network moved to another country: a reload target.
pub fn city_db_moved() -> Vec<u8> {
    write(
        "RegionGuard-Test-City",
        &[
            ("216.160.83.56/29", city("IR", &[], "IR")),
            ("175.16.199.0/24", city("CN", &["22"], "CN")),
        ],
    )
}

/// The flat `{"country_code": "US"}` layout of the ip-location-db databases.
pub fn flat_country_db() -> Vec<u8> {
    write(
        "geo-whois-asn-country",
        &[
            ("216.160.83.0/24", country_code("US")),
            ("5.1.0.0/16", country_code("IR")),
            ("175.16.199.0/24", country_code("CN")),
        ],
    )
}

pub fn anonymous_db() -> Vec<u8> {
    write(
        "GeoIP2-Anonymous-IP",
        &[
            ("1.2.0.0/16", flags(&["is_anonymous", "is_anonymous_vpn"])),
            ("65.0.0.0/13", flags(&["is_anonymous", "is_tor_exit_node"])),
            (
                "71.160.223.0/24",
                flags(&["is_anonymous", "is_hosting_provider"]),
            ),
            (
                "6.1.0.4/32",
                flags(&["is_anonymous", "is_residential_proxy"]),
            ),
            ("8.8.8.0/24", flags(&[])),
        ],
    )
}

pub fn asn_db() -> Vec<u8> {
    write(
        "GeoLite2-ASN",
        &[
            ("216.160.83.0/24", asn(209, "CenturyLink")),
            ("1.2.0.0/16", asn(64500, "Example VPN Ltd")),
        ],
    )
}

/// A location database with no IPv4 data at all: IPv4 lookups match above the IPv4 subtree.
pub fn ipv6_only_city_db() -> Vec<u8> {
    // A network deep on the all-zeros path, so the IPv4 walk ends at depth 48 with an IPv6 answer.
    write(
        "RegionGuard-Test-City-v6",
        &[("0:0:1::/48", city("DE", &[], "DE"))],
    )
}

/// An IPv4-only (`ip_version = 4`) location database: it cannot know an IPv6 address.
pub fn ipv4_only_city_db() -> Vec<u8> {
    let writer = Writer::builder("RegionGuard-Test-City-v4")
        .description(&[("en", "regionguard test fixture")])
        .ip_version(mmdb_writer::IpVersion::V4)
        .build();
    write_with(
        writer,
        &[
            ("5.1.0.0/16", city("IR", &[], "IR")),
            ("216.160.83.56/29", city("US", &["WA"], "US")),
            ("1.2.0.0/16", city("DE", &["BE"], "DE")),
        ],
    )
}

/// A location database written without IPv4 aliases: 6to4 and Teredo addresses are ordinary
/// IPv6 there, and one holds data. One network is narrower than a /64.
pub fn unaliased_city_db() -> Vec<u8> {
    let writer = Writer::builder("RegionGuard-Test-City-unaliased")
        .description(&[("en", "regionguard test fixture")])
        .ipv4_aliasing(mmdb_writer::Ipv4Aliasing::Disabled)
        .build();
    write_with(
        writer,
        &[
            ("5.1.0.0/16", city("IR", &[], "IR")),
            ("2002:501::/32", city("CU", &[], "CU")),
            ("2a02:d2c0::/29", city("IR", &[], "IR")),
            // Narrower than a /64: left to the readers in a table keyed by /64s.
            ("2a02:d2c8::1:0:0/96", city("DE", &[], "DE")),
        ],
    )
}

/// A database whose search tree shares its nodes between branches, so that some 2^100 paths
/// lead to its one record: a one-address database with every empty branch pointed at its
/// sibling node.
pub fn shared_nodes_db() -> Vec<u8> {
    let mut bytes = write(
        "RegionGuard-Test-City",
        &[("::1/128", city("DE", &[], "DE"))],
    );
    let reader = maxminddb::Reader::from_source(bytes.clone()).expect("fixture reads");
    let (nodes, size) = (
        reader.metadata().node_count as usize,
        reader.metadata().record_size as usize,
    );
    assert_eq!(size, 24, "the patch below reads and writes 24-bit records");
    let read = |b: &[u8], at: usize| u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]]) as usize;
    for node in 0..nodes {
        let (left, right) = (read(&bytes, node * 6), read(&bytes, node * 6 + 3));
        let (empty, other) = match (left == nodes, right == nodes) {
            (false, true) if left < nodes => (node * 6 + 3, left),
            (true, false) if right < nodes => (node * 6, right),
            _ => continue,
        };
        bytes[empty..empty + 3].copy_from_slice(&(other as u32).to_be_bytes()[1..]);
    }
    bytes
}
