//! The hash chain over `audit_log`: each row's hash covers its content and the previous row's
//! hash, so editing or deleting any row breaks every hash after it, and `verify` names the first
//! row that does not hold.

use sha2::{Digest, Sha256};

/// The hash a chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit row's content, as hashed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditRow {
    pub kind: String,
    pub ref_id: String,
    pub recorded_at_ms: i64,
    pub actor: String,
    pub account_id: String,
    pub verdict: String,
    pub country: String,
    pub reasons: String,
    pub body: String,
}

impl AuditRow {
    /// The row's hash given the previous row's: SHA-256 over the fields, each length-prefixed so
    /// no two different rows serialise alike.
    pub fn hash(&self, seq: i64, prev_hash: &str) -> String {
        let mut hasher = Sha256::new();
        let fields: [&[u8]; 11] = [
            prev_hash.as_bytes(),
            &seq.to_be_bytes(),
            self.kind.as_bytes(),
            self.ref_id.as_bytes(),
            &self.recorded_at_ms.to_be_bytes(),
            self.actor.as_bytes(),
            self.account_id.as_bytes(),
            self.verdict.as_bytes(),
            self.country.as_bytes(),
            self.reasons.as_bytes(),
            self.body.as_bytes(),
        ];
        for field in fields {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Why the chain does not hold, naming the row.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("row seq {seq} ({kind} {ref_id}): content does not match its hash (edited)")]
    Edited {
        seq: i64,
        kind: String,
        ref_id: String,
    },
    #[error(
        "row seq {seq} ({kind} {ref_id}): previous hash does not match row seq {expected_prev} (a row before it was deleted or edited)"
    )]
    Unlinked {
        seq: i64,
        kind: String,
        ref_id: String,
        expected_prev: i64,
    },
    #[error("rows seq {after} to {seq} are missing (deleted)")]
    Gap { after: i64, seq: i64 },
    #[error(
        "the chain starts at row seq {seq}: the rows before it are missing and no retention checkpoint covers them (deleted)"
    )]
    Unanchored { seq: i64 },
    #[error(
        "row seq {seq} does not have the hash that checkpoint row seq {checkpoint} recorded for it"
    )]
    Checkpoint { seq: i64, checkpoint: i64 },
}

/// Checks rows one at a time, in `seq` order, holding only the last row's seq and hash: a
/// chain of any length verifies in constant memory.
#[derive(Clone, Debug)]
pub struct Walker {
    expected_prev: String,
    last_seq: i64,
    count: u64,
}

impl Default for Walker {
    fn default() -> Self {
        Self {
            expected_prev: GENESIS.to_owned(),
            last_seq: 0,
            count: 0,
        }
    }
}

impl Walker {
    /// Continues a chain whose rows through `last_seq` are gone (retention), from that row's
    /// hash.
    pub fn resume(last_seq: i64, last_hash: String) -> Self {
        Self {
            expected_prev: last_hash,
            last_seq,
            count: 0,
        }
    }

    /// Takes the next row: `Err` names it when it does not continue the chain.
    pub fn push(
        &mut self,
        seq: i64,
        row: &AuditRow,
        prev_hash: &str,
        row_hash: &str,
    ) -> Result<(), ChainBreak> {
        if seq != self.last_seq + 1 {
            return Err(ChainBreak::Gap {
                after: self.last_seq,
                seq,
            });
        }
        if prev_hash != self.expected_prev {
            return Err(ChainBreak::Unlinked {
                seq,
                kind: row.kind.clone(),
                ref_id: row.ref_id.clone(),
                expected_prev: self.last_seq,
            });
        }
        if row.hash(seq, prev_hash) != row_hash {
            return Err(ChainBreak::Edited {
                seq,
                kind: row.kind.clone(),
                ref_id: row.ref_id.clone(),
            });
        }
        row_hash.clone_into(&mut self.expected_prev);
        self.last_seq = seq;
        self.count += 1;
        Ok(())
    }

    /// Rows verified so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Checks rows in `seq` order: `(seq, row, prev_hash, row_hash)`.
pub fn verify<I>(rows: I) -> Result<u64, ChainBreak>
where
    I: IntoIterator<Item = (i64, AuditRow, String, String)>,
{
    let mut walker = Walker::default();
    for (seq, row, prev_hash, row_hash) in rows {
        walker.push(seq, &row, &prev_hash, &row_hash)?;
    }
    Ok(walker.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<(i64, AuditRow, String, String)> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let row = AuditRow {
                    kind: "decision".into(),
                    ref_id: format!("d{seq}"),
                    body: format!("{{\"n\":{seq}}}"),
                    ..Default::default()
                };
                let hash = row.hash(seq, &prev);
                let entry = (seq, row, prev.clone(), hash.clone());
                prev = hash;
                entry
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(chain(5)), Ok(5));
        assert_eq!(verify(Vec::new()), Ok(0));
    }

    #[test]
    fn edits_deletions_and_relinks_are_named() {
        let mut edited = chain(5);
        edited[2].1.body = "{\"n\":99}".into();
        assert!(matches!(
            verify(edited),
            Err(ChainBreak::Edited { seq: 3, .. })
        ));

        let mut deleted = chain(5);
        deleted.remove(2);
        assert_eq!(verify(deleted), Err(ChainBreak::Gap { after: 2, seq: 4 }));

        // Deleting the last row and renumbering cannot hide: the hashes bind seq.
        let mut renumbered = chain(5);
        renumbered.remove(1);
        for (i, entry) in renumbered.iter_mut().enumerate() {
            entry.0 = i as i64 + 1;
        }
        assert!(verify(renumbered).is_err());
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let a = AuditRow {
            actor: "ab".into(),
            account_id: "c".into(),
            ..Default::default()
        };
        let b = AuditRow {
            actor: "a".into(),
            account_id: "bc".into(),
            ..Default::default()
        };
        assert_ne!(a.hash(1, GENESIS), b.hash(1, GENESIS));
    }
}
