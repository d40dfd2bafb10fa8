//! The mutable tables (`overrides`, `review_queue`) against the chain. The writer changes them
//! only in the same transaction as a chained reviewer row, and puts the table row it left into
//! that row's body (`"applied"`), so a verified chain says what the tables must hold; any
//! difference means a table was written around the Review API.
//!
//! Pure: [`Expected`] is built from the rows of a verified chain, then compared with what the
//! tables hold; `store::verify` does the reading.

use std::collections::HashMap;

use serde_json::Value;

use super::chain::{AuditRow, ChainKey};
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

/// What the tables must hold, from the chain's reviewer rows. Overrides are kept (the last
/// state each one was left in; the table is small and reviewer-made); resolutions are not: a
/// decision is resolved once, so each is handed back to be checked against its queue item at
/// once, and the queue is then checked by counting.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    overrides: HashMap<String, OverrideRecord>,
    /// A reviewer row whose change cannot be read.
    unreadable: Option<(i64, String)>,
    /// Such a row changed an override: the overrides cannot be told from the chain.
    unreadable_override: bool,
    /// The first row of a changing call written before rows recorded their change: the tables
    /// cannot be held to the chain.
    legacy: Option<i64>,
}

/// A resolution the chain records, to check against the queue now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub decision_id: String,
    pub state: QueueState,
}

const CHANGING_CALLS: [&str; 3] = ["SetOverride", "RemoveOverride", "Resolve"];

impl Expected {
    /// Starting from a retention checkpoint's copy of the overrides table.
    pub fn from_overrides(overrides: Vec<OverrideRecord>) -> Self {
        Self {
            overrides: overrides.into_iter().map(|o| (o.id.clone(), o)).collect(),
            ..Self::default()
        }
    }

    /// Takes one verified row, in chain order; a resolution comes back to be checked.
    pub fn observe(&mut self, seq: i64, row: &AuditRow) -> Option<Resolution> {
        if row.kind != "review" {
            return None;
        }
        let mut body = serde_json::from_str::<Value>(&row.body).ok()?;
        let Some(applied) = body.get_mut("applied").map(Value::take) else {
            if body["rpc"]
                .as_str()
                .is_some_and(|rpc| CHANGING_CALLS.contains(&rpc))
            {
                self.legacy.get_or_insert(seq);
            }
            return None; // a call that changed no table
        };
        if let Some(record) = applied.get("override") {
            match serde_json::from_value::<OverrideRecord>(record.clone()) {
                Ok(record) => drop(self.overrides.insert(record.id.clone(), record)),
                Err(e) => {
                    self.unreadable_override = true;
                    self.unreadable.get_or_insert((seq, e.to_string()));
                }
            }
            return None;
        }
        let item = applied.get("queue_item")?;
        match serde_json::from_value::<QueueState>(item["state"].clone()) {
            Ok(state) => Some(Resolution {
                decision_id: item["decision_id"].as_str().unwrap_or_default().to_owned(),
                state,
            }),
            Err(e) => {
                self.unreadable.get_or_insert((seq, e.to_string()));
                None
            }
        }
    }

    /// The overrides as the rows observed left them.
    pub fn into_overrides(self) -> Vec<OverrideRecord> {
        let mut all: Vec<OverrideRecord> = self.overrides.into_values().collect();
        all.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        all
    }

    /// The first row that predates recorded changes, if any: the tables cannot be checked.
    pub fn legacy(&self) -> Option<i64> {
        self.legacy
    }

    /// Whether the overrides can be told from the rows observed: none predates recorded
    /// changes, and every override change could be read.
    pub fn overrides_known(&self) -> bool {
        self.legacy.is_none() && !self.unreadable_override
    }

    /// A reviewer row whose change cannot be read.
    pub fn check_readable(&self) -> Result<(), TableMismatch> {
        match &self.unreadable {
            None => Ok(()),
            Some((seq, error)) => Err(mismatch(
                "audit_log",
                &format!("row seq {seq}"),
                format!("the change it records cannot be read ({error})"),
            )),
        }
    }

    /// The `overrides` table, whole, against the chain.
    pub fn check_overrides(&self, table: &[OverrideRecord]) -> Result<(), TableMismatch> {
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
        let present: std::collections::HashSet<&str> =
            table.iter().map(|r| r.id.as_str()).collect();
        let mut gone: Vec<&String> = self
            .overrides
            .keys()
            .filter(|id| !present.contains(id.as_str()))
            .collect();
        gone.sort();
        match gone.first() {
            Some(id) => Err(mismatch(
                "overrides",
                id,
                "set in the audit log but missing from the table (deleted)",
            )),
            None => Ok(()),
        }
    }
}

/// The overrides the audit chain records, kept current by reading only the reviewer rows
/// appended since the last read (`after`). These, not the table, are what the engine enforces
/// and reviewers are shown: a row written into the `overrides` table around the Review API (or
/// one changed or deleted there) changes nothing, and is reported. A reviewer row is taken only
/// when it holds where it stands ([`super::chain::check_row`]: keyed under `key`, or plain,
/// linked to the row before it and hashed as written); one that does not is skipped, and the
/// next read starts after the last row taken. When the chain cannot say (a changing call
/// recorded before rows carried their change, or a change that cannot be read), the table
/// stands, as `verify` then leaves the tables unchecked.
#[derive(Clone, Debug, Default)]
pub struct OnRecord {
    after: i64,
    expected: Expected,
    key: Option<ChainKey>,
}

/// What [`OnRecord::resolve`] found: the overrides to enforce, and the first way the table
/// differs from the chain, if it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub overrides: Vec<OverrideRecord>,
    pub off_record: Option<TableMismatch>,
}

impl OnRecord {
    /// Nothing read yet; keyed rows are checked with `key`.
    pub fn keyed(key: Option<ChainKey>) -> Self {
        Self {
            key,
            ..Self::default()
        }
    }

    pub fn key(&self) -> Option<&ChainKey> {
        self.key.as_ref()
    }

    /// Starts again at a retention checkpoint (row `seq`) and its copy of the overrides.
    pub fn restart_at(&mut self, seq: i64, overrides: Vec<OverrideRecord>, legacy: bool) {
        let mut expected = Expected::from_overrides(overrides);
        if legacy {
            expected.legacy = Some(seq);
        }
        self.expected = expected;
        self.after = seq;
    }

    /// The last row taken; the next read starts after it.
    pub fn after(&self) -> i64 {
        self.after
    }

    /// Takes one reviewer row after [`OnRecord::after`], in chain order, once it holds.
    pub fn observe(&mut self, seq: i64, row: &AuditRow) {
        // A resolution is checked by `verify`, not here.
        let _ = self.expected.observe(seq, row);
        self.after = self.after.max(seq);
    }

    /// Starts the next read after `seq`: every row up to it that could change an override
    /// has been taken.
    pub fn skip_to(&mut self, seq: i64) {
        self.after = self.after.max(seq);
    }

    fn says(&self) -> bool {
        self.expected.overrides_known()
    }

    /// Override `id` as the chain records it: `Some(None)` when it records none, `None` when
    /// the chain cannot say (the table then stands).
    pub fn recorded(&self, id: &str) -> Option<Option<OverrideRecord>> {
        self.says()
            .then(|| self.expected.overrides.get(id).cloned())
    }

    /// The overrides to enforce, given what the table holds.
    pub fn resolve(&self, table: Vec<OverrideRecord>) -> Resolved {
        if !self.says() {
            return Resolved {
                overrides: table,
                off_record: None,
            };
        }
        let off_record = self.expected.check_overrides(&table).err();
        let overrides = match off_record {
            None => table,
            Some(_) => self.expected.clone().into_overrides(),
        };
        Resolved {
            overrides,
            off_record,
        }
    }
}

/// A resolution from the chain against its queue item as the table holds it.
pub fn check_resolution(
    resolution: &Resolution,
    item: Option<&QueueState>,
) -> Result<(), TableMismatch> {
    let id = resolution.decision_id.as_str();
    match item {
        None => Err(mismatch(
            "review_queue",
            id,
            "resolved in the audit log but missing from the queue (deleted)",
        )),
        Some(state) if state.status != resolution.state.status => Err(mismatch(
            "review_queue",
            id,
            format!(
                "status is {:?} in the table but {:?} in the audit log (resolution undone)",
                state.status, resolution.state.status
            ),
        )),
        Some(state) => match difference(state, &resolution.state) {
            None => Ok(()),
            Some(problem) => Err(mismatch("review_queue", id, problem)),
        },
    }
}

/// One `review_queue` item on its own: it points at its REVIEW decision row (`decision` is
/// `(kind, ref_id, verdict)` of the audit row at the item's seq), and an open item carries no
/// resolution. Resolved items are matched to the chain's resolutions by the caller.
pub fn check_queue_item(
    decision_id: &str,
    decision: Option<(&str, &str, &str)>,
    state: &QueueState,
) -> Result<(), TableMismatch> {
    let item = |problem: String| Err(mismatch("review_queue", decision_id, problem));
    if decision != Some(("decision", decision_id, "REVIEW")) {
        return item("does not point at a REVIEW decision row of the audit log".into());
    }
    match state.status.as_str() {
        "resolved" => Ok(()),
        "open" => {
            let untouched = QueueState {
                status: "open".into(),
                outcome: String::new(),
                note: String::new(),
                resolved_by: String::new(),
                resolved_at_ms: None,
            };
            match difference(state, &untouched) {
                None => Ok(()),
                Some(problem) => item(format!("open, but {problem}")),
            }
        }
        other => item(format!("status {other:?} is neither open nor resolved")),
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
        // A checkpoint's copy stands for rows retention removed.
        let resumed = Expected::from_overrides(vec![removed.clone()]);
        assert_eq!(resumed.check_overrides(&[removed]), Ok(()));
    }

    #[test]
    fn the_overrides_enforced_are_the_ones_the_chain_records() {
        let mut on_record = OnRecord::default();
        on_record.observe(
            3,
            &reviewer_row(serde_json::json!({ "override": record() })),
        );
        assert_eq!(on_record.after(), 3);
        assert_eq!(
            on_record.resolve(vec![record()]),
            Resolved {
                overrides: vec![record()],
                off_record: None
            }
        );
        let planted = OverrideRecord {
            id: "o2".into(),
            value: "acct-2".into(),
            ..record()
        };
        let resolved = on_record.resolve(vec![record(), planted.clone()]);
        assert_eq!(resolved.overrides, vec![record()], "planted: not enforced");
        assert!(
            resolved
                .off_record
                .unwrap()
                .to_string()
                .starts_with("overrides: o2: no reviewer row"),
        );
        assert_eq!(on_record.recorded("o1"), Some(Some(record())));
        assert_eq!(on_record.recorded("o2"), Some(None));
        let resolved = on_record.resolve(Vec::new());
        assert_eq!(
            resolved.overrides,
            vec![record()],
            "deleted: still enforced"
        );
        assert!(resolved.off_record.is_some());

        // When the chain cannot say, the table stands.
        let mut legacy = OnRecord::default();
        legacy.restart_at(9, Vec::new(), true);
        assert_eq!(legacy.after(), 9);
        assert_eq!(
            legacy.resolve(vec![planted.clone()]).overrides,
            vec![planted.clone()]
        );
        let mut unrecorded = OnRecord::default();
        unrecorded.observe(
            1,
            &AuditRow {
                kind: "review".into(),
                body: serde_json::json!({ "rpc": "SetOverride", "request": {} }).to_string(),
                ..Default::default()
            },
        );
        assert_eq!(
            unrecorded.resolve(vec![planted.clone()]).overrides,
            vec![planted]
        );
        assert_eq!(unrecorded.recorded("o2"), None, "the chain cannot say");
        // An unreadable resolution says nothing about overrides; an unreadable override does.
        let mut queue_garbled = on_record.clone();
        queue_garbled.observe(
            5,
            &reviewer_row(serde_json::json!({ "queue_item": { "state": 7 } })),
        );
        assert_eq!(queue_garbled.recorded("o1"), Some(Some(record())));
        let mut garbled = on_record.clone();
        garbled.observe(
            6,
            &reviewer_row(serde_json::json!({ "override": { "id": 3 } })),
        );
        assert_eq!(garbled.recorded("o1"), None);
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

    fn resolved() -> QueueState {
        QueueState {
            status: "resolved".into(),
            outcome: "confirmed".into(),
            note: "ok".into(),
            resolved_by: "alice".into(),
            resolved_at_ms: Some(3000),
        }
    }

    #[test]
    fn queue_items_point_at_their_decision_and_open_ones_carry_no_resolution() {
        let row = Some(("decision", "d1", "REVIEW"));
        assert_eq!(check_queue_item("d1", row, &open()), Ok(()));
        assert_eq!(check_queue_item("d1", row, &resolved()), Ok(()));
        assert!(check_queue_item("d1", Some(("decision", "d1", "ALLOW")), &open()).is_err());
        assert!(check_queue_item("d1", None, &open()).is_err());
        let forged = QueueState {
            resolved_by: "mallory".into(),
            ..open()
        };
        assert_eq!(
            check_queue_item("d1", row, &forged)
                .unwrap_err()
                .to_string(),
            "review_queue: d1: open, but resolved_by is \"mallory\" in the table but \"\" in the audit log"
        );
        let odd = QueueState {
            status: "parked".into(),
            ..open()
        };
        assert!(check_queue_item("d1", row, &odd).is_err());
    }

    #[test]
    fn resolutions_come_back_to_be_checked_against_their_item() {
        let mut expected = Expected::default();
        let resolution = expected
            .observe(
                5,
                &reviewer_row(
                    serde_json::json!({ "queue_item": { "decision_id": "d1", "state": resolved() } }),
                ),
            )
            .unwrap();
        assert_eq!(resolution.decision_id, "d1");
        assert_eq!(check_resolution(&resolution, Some(&resolved())), Ok(()));
        assert!(
            check_resolution(&resolution, Some(&open()))
                .unwrap_err()
                .to_string()
                .contains("(resolution undone)")
        );
        let rewritten = QueueState {
            outcome: "cleared".into(),
            ..resolved()
        };
        assert!(check_resolution(&resolution, Some(&rewritten)).is_err());
        assert!(
            check_resolution(&resolution, None)
                .unwrap_err()
                .to_string()
                .contains("missing from the queue")
        );
    }

    #[test]
    fn rows_without_a_change_are_ignored_old_changing_rows_and_unreadable_ones_are_named() {
        let mut expected = Expected::default();
        let plain = AuditRow {
            kind: "review".into(),
            body: "{\"rpc\":\"ListQueue\"}".into(),
            ..Default::default()
        };
        assert_eq!(expected.observe(1, &plain), None);
        assert_eq!(expected.observe(2, &AuditRow::default()), None);
        assert_eq!(expected.check_readable(), Ok(()));
        assert_eq!(expected.legacy(), None);
        let old = AuditRow {
            kind: "review".into(),
            body: "{\"rpc\":\"Resolve\",\"request\":{}}".into(),
            ..Default::default()
        };
        expected.observe(3, &old);
        assert_eq!(expected.legacy(), Some(3));
        expected.observe(
            9,
            &reviewer_row(serde_json::json!({ "override": { "id": 3 } })),
        );
        assert!(
            expected
                .check_readable()
                .unwrap_err()
                .to_string()
                .starts_with("audit_log: row seq 9: the change it records cannot be read")
        );
    }
}
