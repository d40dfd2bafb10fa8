//! The mutable tables (`overrides`, `review_queue`) against the chain. The writer changes them
//! only in the same transaction as a chained reviewer row, and puts the table row it left into
//! that row's body (`"applied"`), so a verified chain says what the tables must hold; any
//! difference means a table was written around the Review API.
//!
//! Pure: [`Expected`] is built from the rows of a verified chain, then compared with what the
//! tables hold. Reviewer actions are rare, so what it keeps is small; open queue items are not
//! kept (each is checked against its decision row).

use std::collections::HashMap;

use serde_json::Value;

use super::chain::AuditRow;
use super::{OverrideRecord, QueueState};

/// A table that does not match the chain, naming the row.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{table}: {key}: {problem}")]
pub struct TableMismatch {
    pub table: &'static str,
    pub key: String,
    pub problem: String,
}

fn mismatch(table: &'static str, key: &str, problem: impl Into<String>) -> TableMismatch {
    TableMismatch {
        table,
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// The first field in which two records differ, as `field is X in the table but Y in the
/// audit log`.
fn difference<T: serde::Serialize>(table: &T, chain: &T) -> Option<String> {
    let (Ok(Value::Object(table)), Ok(Value::Object(chain))) =
        (serde_json::to_value(table), serde_json::to_value(chain))
    else {
        return Some("cannot be compared".into());
    };
    table.iter().find_map(|(field, value)| {
        let recorded = chain.get(field).unwrap_or(&Value::Null);
        (value != recorded)
            .then(|| format!("{field} is {value} in the table but {recorded} in the audit log"))
    })
}

/// What the tables must hold, from the chain's reviewer rows: the last state each reviewer
/// action left.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    overrides: HashMap<String, OverrideRecord>,
    resolutions: HashMap<String, QueueState>,
    /// A reviewer row whose `applied` part cannot be read.
    unreadable: Option<(i64, String)>,
}

impl Expected {
    /// Takes one verified row, in chain order.
    pub fn observe(&mut self, seq: i64, row: &AuditRow) {
        if row.kind != "review" {
            return;
        }
        let Some(applied) = serde_json::from_str::<Value>(&row.body)
            .ok()
            .and_then(|mut body| body.get_mut("applied").map(Value::take))
        else {
            return; // an action that changed no table
        };
        let read = if let Some(record) = applied.get("override") {
            serde_json::from_value::<OverrideRecord>(record.clone())
                .map(|record| drop(self.overrides.insert(record.id.clone(), record)))
        } else if let Some(item) = applied.get("queue_item") {
            let id = item["decision_id"].as_str().unwrap_or_default().to_owned();
            serde_json::from_value::<QueueState>(item["state"].clone())
                .map(|state| drop(self.resolutions.insert(id, state)))
        } else {
            Ok(())
        };
        if let Err(e) = read {
            self.unreadable.get_or_insert((seq, e.to_string()));
        }
    }

    /// The `overrides` table, whole, against the chain.
    pub fn check_overrides(&self, table: &[OverrideRecord]) -> Result<(), TableMismatch> {
        if let Some((seq, error)) = &self.unreadable {
            return Err(mismatch(
                "audit_log",
                &format!("row seq {seq}"),
                format!("the change it records cannot be read ({error})"),
            ));
        }
        for record in table {
            let Some(recorded) = self.overrides.get(&record.id) else {
                return Err(mismatch(
                    "overrides",
                    &record.id,
                    "no reviewer row in the audit log set it (written outside the Review API)",
                ));
            };
            if let Some(problem) = difference(record, recorded) {
                return Err(mismatch("overrides", &record.id, problem));
            }
        }
        if self.overrides.len() != table.len() {
            let mut gone: Vec<&String> = self
                .overrides
                .keys()
                .filter(|id| !table.iter().any(|r| &r.id == *id))
                .collect();
            gone.sort();
            if let Some(id) = gone.first() {
                return Err(mismatch(
                    "overrides",
                    id,
                    "set in the audit log but missing from the table (deleted)",
                ));
            }
        }
        Ok(())
    }

    /// One `review_queue` item against the chain: `decision` is `(kind, ref_id, verdict)` of the
    /// audit row at the item's seq, if there is one.
    pub fn check_queue_item(
        &self,
        decision_id: &str,
        decision: Option<(&str, &str, &str)>,
        state: &QueueState,
    ) -> Result<(), TableMismatch> {
        let item = |problem: String| Err(mismatch("review_queue", decision_id, problem));
        if decision != Some(("decision", decision_id, "REVIEW")) {
            return item("does not point at a REVIEW decision row of the audit log".into());
        }
        match (self.resolutions.get(decision_id), state.status.as_str()) {
            (None, "open") => Ok(()),
            (None, _) => item(format!(
                "status {:?} in the table, with no resolution in the audit log",
                state.status
            )),
            (Some(recorded), status) if status != recorded.status => item(format!(
                "status is {status:?} in the table but {:?} in the audit log (resolution undone)",
                recorded.status
            )),
            (Some(recorded), _) => match difference(state, recorded) {
                None => Ok(()),
                Some(problem) => item(problem),
            },
        }
    }

    /// Decisions resolved in the chain, for checking that each still has its queue item.
    pub fn resolved_decisions(&self) -> impl Iterator<Item = &str> {
        self.resolutions.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewer_row(applied: Value) -> AuditRow {
        AuditRow {
            kind: "review".into(),
            body: serde_json::json!({ "rpc": "X", "request": {}, "applied": applied }).to_string(),
            ..Default::default()
        }
    }

    fn record() -> OverrideRecord {
        OverrideRecord {
            id: "o1".into(),
            scope: "account".into(),
            value: "acct-1".into(),
            action: "ALLOW".into(),
            reviewer: "alice".into(),
            reason: "verified".into(),
            created_at_ms: 1000,
            expires_at_ms: None,
            removed_at_ms: None,
            removed_by: String::new(),
        }
    }

    #[test]
    fn overrides_match_their_rows_and_every_difference_is_named() {
        let mut expected = Expected::default();
        expected.observe(
            1,
            &reviewer_row(serde_json::json!({ "override": record() })),
        );
        assert_eq!(expected.check_overrides(&[record()]), Ok(()));

        let problem =
            |table: &[OverrideRecord]| expected.check_overrides(table).unwrap_err().to_string();
        assert_eq!(
            problem(&[]),
            "overrides: o1: set in the audit log but missing from the table (deleted)"
        );
        let flipped = OverrideRecord {
            action: "DENY".into(),
            ..record()
        };
        assert_eq!(
            problem(&[flipped]),
            "overrides: o1: action is \"DENY\" in the table but \"ALLOW\" in the audit log"
        );
        let planted = OverrideRecord {
            id: "o2".into(),
            ..record()
        };
        assert!(problem(&[record(), planted]).starts_with("overrides: o2: no reviewer row"));
        let extended = OverrideRecord {
            expires_at_ms: Some(5),
            ..record()
        };
        assert!(problem(&[extended]).contains("expires_at_ms is 5 in the table but null"));

        // A later row (the removal) is the state the table must hold.
        let removed = OverrideRecord {
            removed_at_ms: Some(2000),
            removed_by: "bob".into(),
            ..record()
        };
        expected.observe(2, &reviewer_row(serde_json::json!({ "override": removed })));
        assert_eq!(
            expected.check_overrides(std::slice::from_ref(&removed)),
            Ok(())
        );
        assert!(
            expected
                .check_overrides(&[record()])
                .unwrap_err()
                .to_string()
                .contains("removed_at_ms is null in the table but 2000")
        );
    }

    fn open() -> QueueState {
        QueueState {
            status: "open".into(),
            outcome: String::new(),
            note: String::new(),
            resolved_by: String::new(),
            resolved_at_ms: None,
        }
    }

    #[test]
    fn queue_items_match_their_decision_and_resolution() {
        let mut expected = Expected::default();
        let row = Some(("decision", "d1", "REVIEW"));
        assert_eq!(expected.check_queue_item("d1", row, &open()), Ok(()));
        assert!(
            expected
                .check_queue_item("d1", Some(("decision", "d1", "ALLOW")), &open())
                .is_err()
        );
        assert!(expected.check_queue_item("d1", None, &open()).is_err());

        let resolved = QueueState {
            status: "resolved".into(),
            outcome: "confirmed".into(),
            note: "ok".into(),
            resolved_by: "alice".into(),
            resolved_at_ms: Some(3000),
        };
        assert!(
            expected
                .check_queue_item("d1", row, &resolved)
                .unwrap_err()
                .to_string()
                .contains("with no resolution in the audit log")
        );
        expected.observe(
            5,
            &reviewer_row(
                serde_json::json!({ "queue_item": { "decision_id": "d1", "state": resolved } }),
            ),
        );
        assert_eq!(expected.check_queue_item("d1", row, &resolved), Ok(()));
        assert!(
            expected
                .check_queue_item("d1", row, &open())
                .unwrap_err()
                .to_string()
                .contains("status is \"open\" in the table but \"resolved\"")
        );
        let rewritten = QueueState {
            outcome: "cleared".into(),
            ..resolved
        };
        assert!(expected.check_queue_item("d1", row, &rewritten).is_err());
        assert_eq!(expected.resolved_decisions().collect::<Vec<_>>(), ["d1"]);
    }

    #[test]
    fn rows_without_a_change_are_ignored_and_an_unreadable_change_is_named() {
        let mut expected = Expected::default();
        let plain = AuditRow {
            kind: "review".into(),
            body: "{\"rpc\":\"ListQueue\"}".into(),
            ..Default::default()
        };
        expected.observe(1, &plain);
        expected.observe(2, &AuditRow::default());
        assert_eq!(expected.check_overrides(&[]), Ok(()));
        expected.observe(
            9,
            &reviewer_row(serde_json::json!({ "override": { "id": 3 } })),
        );
        assert!(
            expected
                .check_overrides(&[])
                .unwrap_err()
                .to_string()
                .starts_with("audit_log: row seq 9: the change it records cannot be read")
        );
    }
}
