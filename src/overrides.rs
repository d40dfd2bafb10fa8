//! The in-memory index of reviewer overrides the engine matches requests against.
//!
//! Built from the store's override rows (all of them; expiry is checked per request against the
//! request's time) and replaced whole whenever a reviewer sets or removes one.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::classify::{FleetFacts, OverrideAction, OverrideFact};
use crate::store::OverrideRecord;

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
                    .entry(record.value.to_ascii_lowercase())
                    .or_default()
                    .push(record),
                "fleet" => index
                    .by_fleet
                    .entry(record.value.to_ascii_lowercase())
                    .or_default()
                    .push(record),
                "network" => match record.value.parse::<IpNetwork>() {
                    Ok(network) => index.networks.push((network, record)),
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
            .and_then(|d| self.by_domain.get(&d.to_ascii_lowercase()))
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
