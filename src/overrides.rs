//! The in-memory index of reviewer overrides the engine matches requests against.
//!
//! Built from the store's override rows (all of them; expiry is checked per request against the
//! request's time) and replaced whole whenever a reviewer sets or removes one.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::classify::{FleetFacts, OverrideAction, OverrideFact};
use crate::store::OverrideRecord;

/// The form a domain override is matched in, on both sides: lowercase, without the trailing
/// dot of a fully qualified name (`Example.COM.` is `example.com`).
pub fn canonical_domain(domain: &str) -> String {
    domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase()
}

/// The form a network override is matched in: an IPv4 network written IPv4-mapped
/// (`::ffff:9.9.9.0/120`) is that IPv4 network (`9.9.9.0/24`), as a request's IPv4-mapped
/// address is its IPv4 address; otherwise it could never match.
pub fn canonical_network(network: IpNetwork) -> IpNetwork {
    match network {
        IpNetwork::V6(v6) if v6.prefix() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnetwork::Ipv4Network::new(v4, v6.prefix() - 96)
                .map(IpNetwork::V4)
                .unwrap_or(network),
            None => network,
        },
        other => other,
    }
}

#[derive(Debug, Default)]
pub struct OverrideIndex {
    by_account: HashMap<String, Vec<OverrideRecord>>,
    by_domain: HashMap<String, Vec<OverrideRecord>>,
    by_fleet: HashMap<String, Vec<OverrideRecord>>,
    networks: Vec<(IpNetwork, OverrideRecord)>,
}

impl OverrideIndex {
    /// Indexes the records that are not removed; a network override whose value does not parse
    /// is skipped (SetOverride validates it, so only a hand-edited store has one).
    pub fn new(records: impl IntoIterator<Item = OverrideRecord>) -> Self {
        let mut index = Self::default();
        for record in records.into_iter().filter(|r| r.removed_at_ms.is_none()) {
            match record.scope.as_str() {
                "account" => index
                    .by_account
                    .entry(record.value.clone())
                    .or_default()
                    .push(record),
                "domain" => index
                    .by_domain
                    .entry(canonical_domain(&record.value))
                    .or_default()
                    .push(record),
                "fleet" => index
                    .by_fleet
                    .entry(record.value.to_ascii_lowercase())
                    .or_default()
                    .push(record),
                "network" => match record.value.parse::<IpNetwork>() {
                    Ok(network) => index.networks.push((canonical_network(network), record)),
                    Err(error) => {
                        tracing::warn!(id = %record.id, %error, "skipping network override with a bad value")
                    }
                },
                other => {
                    tracing::warn!(id = %record.id, scope = other, "skipping override with an unknown scope")
                }
            }
        }
        index
    }

    pub fn is_empty(&self) -> bool {
        self.by_account.is_empty()
            && self.by_domain.is_empty()
            && self.by_fleet.is_empty()
            && self.networks.is_empty()
    }

    /// Overrides active at `now_ms` for this account, organisation domain, address or fleet
    /// (the usage history's fleet for the account: its id, or any id it had before).
    pub fn matching(
        &self,
        account_id: Option<&str>,
        domain: Option<&str>,
        ip: IpAddr,
        fleet: Option<&FleetFacts>,
        now_ms: i64,
    ) -> Vec<OverrideFact> {
        if self.is_empty() {
            return Vec::new();
        }
        let accounts = account_id
            .and_then(|a| self.by_account.get(a))
            .into_iter()
            .flatten();
        let domains = domain
            .and_then(|d| self.by_domain.get(&canonical_domain(d)))
            .into_iter()
            .flatten();
        // A DENY follows the fleet through the ids it had; an ALLOW holds for its current id
        // only (a fleet that another links into must not lend it the ALLOW).
        let current = fleet
            .and_then(|f| self.by_fleet.get(&f.id))
            .into_iter()
            .flatten();
        let former = fleet
            .into_iter()
            .flat_map(|f| &f.formerly)
            .filter_map(|id| self.by_fleet.get(id))
            .flatten()
            .filter(|r| r.action == "DENY");
        let fleets = current.chain(former);
        let ip = ip.to_canonical();
        let networks = self
            .networks
            .iter()
            .filter(|(n, _)| n.contains(ip))
            .map(|(_, r)| r);
        accounts
            .chain(domains)
            .chain(networks)
            .chain(fleets)
            .filter(|r| r.active_at(now_ms))
            .map(|r| OverrideFact {
                id: r.id.clone(),
                action: if r.action == "DENY" {
                    OverrideAction::Deny
                } else {
                    OverrideAction::Allow
                },
                scope: format!("{}:{}", r.scope, r.value),
                reviewer: r.reviewer.clone(),
                reason: r.reason.clone(),
                expires_at_ms: r.expires_at_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        id: &str,
        scope: &str,
        value: &str,
        action: &str,
        expires: Option<i64>,
    ) -> OverrideRecord {
        OverrideRecord {
            id: id.into(),
            scope: scope.into(),
            value: value.into(),
            action: action.into(),
            reviewer: "alice".into(),
            reason: "checked".into(),
            created_at_ms: 0,
            expires_at_ms: expires,
            removed_at_ms: None,
            removed_by: String::new(),
        }
    }

    fn fleet(id: &str, formerly: &[&str]) -> FleetFacts {
        FleetFacts {
            id: id.into(),
            formerly: formerly.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A domain written fully qualified and a network written IPv4-mapped match the requests
    /// they name, on either side, in whatever form (hostile pass: both were accepted and never
    /// matched).
    #[test]
    fn trailing_dots_and_ipv4_mapped_networks_match_what_they_name() {
        let index = OverrideIndex::new([
            record("1", "domain", "Trail.COM.", "DENY", None),
            record("2", "domain", "plain.com", "DENY", None),
            record("3", "network", "::ffff:9.9.9.0/120", "DENY", None),
            record("4", "network", "4.4.4.0/24", "DENY", None),
        ]);
        let ids = |domain: &str, ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            let matched = index.matching(None, Some(domain), ip, None, 0);
            matched.into_iter().map(|o| o.id).collect::<Vec<_>>()
        };
        assert_eq!(ids("trail.com", "203.0.113.1"), ["1"]);
        assert_eq!(ids("plain.com.", "203.0.113.1"), ["2"]);
        assert_eq!(ids("x.org", "9.9.9.9"), ["3"]);
        assert_eq!(ids("x.org", "::ffff:9.9.9.9"), ["3"]);
        assert_eq!(ids("x.org", "::ffff:4.4.4.4"), ["4"]);
        assert!(ids("x.org", "9.9.10.1").is_empty());
        assert_eq!(
            canonical_network("::ffff:9.9.9.0/120".parse().unwrap()).to_string(),
            "9.9.9.0/24"
        );
        // A wider IPv6 network is IPv6 space, not IPv4's, and stays as written.
        assert_eq!(
            canonical_network("::ffff:0.0.0.0/95".parse().unwrap()).to_string(),
            "::ffff:0.0.0.0/95"
        );
    }

    #[test]
    fn matches_account_domain_and_network_while_active() {
        let mut removed = record("r", "account", "a", "DENY", None);
        removed.removed_at_ms = Some(5);
        let index = OverrideIndex::new([
            record("1", "account", "a", "ALLOW", Some(1000)),
            record("2", "domain", "Example.com", "DENY", None),
            record("3", "network", "198.51.100.0/24", "ALLOW", None),
            record("4", "fleet", "fl_00112233445566ff", "DENY", None),
            record("5", "fleet", "fl_0011223344556601", "ALLOW", None),
            removed,
        ]);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let ids = |m: Vec<OverrideFact>| m.into_iter().map(|o| o.id).collect::<Vec<_>>();
        assert_eq!(
            ids(index.matching(Some("a"), Some("example.COM"), ip, None, 500)),
            ["1", "2", "3"]
        );
        assert_eq!(
            ids(index.matching(
                Some("z"),
                None,
                "203.0.113.1".parse().unwrap(),
                Some(&fleet("fl_00112233445566ff", &[])),
                0
            )),
            ["4"],
            "the account's fleet"
        );
        assert_eq!(
            ids(index.matching(
                Some("z"),
                None,
                "203.0.113.1".parse().unwrap(),
                Some(&fleet("fl_aaaaaaaaaaaaaaaa", &["fl_00112233445566ff"])),
                0
            )),
            ["4"],
            "a fleet that merged into another, or took an earlier founder: its former id"
        );
        assert_eq!(
            ids(index.matching(
                Some("z"),
                None,
                "203.0.113.1".parse().unwrap(),
                Some(&fleet("fl_0011223344556600", &["fl_0011223344556601"])),
                0
            )),
            Vec::<String>::new(),
            "another fleet, and an ALLOW on a former id"
        );
        assert_eq!(
            ids(index.matching(Some("a"), None, "203.0.113.1".parse().unwrap(), None, 1000)),
            Vec::<String>::new(),
            "expired"
        );
        assert_eq!(
            index.matching(Some("b"), None, ip, None, 0)[0].scope,
            "network:198.51.100.0/24"
        );
    }
}
