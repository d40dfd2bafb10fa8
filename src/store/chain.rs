//! The hash chain over `audit_log`: each row's hash covers its content and the previous row's
//! hash, so editing or deleting any row breaks every hash after it, and `verify` names the first
//! row that does not hold.
//!
//! With a chain key (`[store] chain_key_file`), rows carry an HMAC-SHA-256 under that key
//! (`k1:<hex>`) instead of a plain SHA-256: without the key, nobody can append, edit or rewrite
//! rows that verify. Once a row is keyed, every later row must be (no downgrade), and the keyed
//! rows anchor the unkeyed ones before them through their `prev_hash`.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::hex;

/// The prefix of a keyed row hash.
pub const KEYED: &str = "k1:";

/// The secret the chain is keyed with. Its bytes never reach a log.
#[derive(Clone)]
pub struct ChainKey(Arc<[u8]>);

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey(<redacted>)")
    }
}

impl ChainKey {
    /// At least 32 bytes (e.g. `head -c 32 /dev/urandom > audit.key`).
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 32 {
            return Err(format!(
                "a chain key needs at least 32 bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes.into()))
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The hash a chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit row's content, as hashed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The fields as hashed, each length-prefixed so no two different rows serialise alike.
    fn feed(&self, seq: i64, prev_hash: &str, mut update: impl FnMut(&[u8])) {
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
            update(&(field.len() as u64).to_be_bytes());
            update(field);
        }
    }

    /// The row's plain hash given the previous row's: SHA-256 over the fields.
    pub fn hash(&self, seq: i64, prev_hash: &str) -> String {
        let mut hasher = Sha256::new();
        self.feed(seq, prev_hash, |bytes| hasher.update(bytes));
        hex(&hasher.finalize())
    }

    /// The row's hash under `key` (`k1:` + HMAC-SHA-256 over the same fields), or the plain
    /// hash without one.
    pub fn hash_with(&self, seq: i64, prev_hash: &str, key: Option<&ChainKey>) -> String {
        let Some(key) = key else {
            return self.hash(seq, prev_hash);
        };
        // HMAC takes keys of any length: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key.0) else {
            return self.hash(seq, prev_hash);
        };
        self.feed(seq, prev_hash, |bytes| mac.update(bytes));
        format!("{KEYED}{}", hex(&mac.finalize().into_bytes()))
    }
}

/// Whether one row holds where it stands, for a reader that takes rows one at a time (the
/// overrides on record) rather than walking the chain. A keyed row vouches for itself: its
/// HMAC under `key` covers its seq and the hash before it, so only a keyholder wrote it there
/// (a row before it deleted or edited is a break for `verify` to name, not a reason to drop
/// this one). A plain row must be linked to the hash of the row before it (`predecessor`: none
/// when that row is not there; row 1 follows [`GENESIS`]), must not follow a keyed row, and must
/// be hashed as written.
pub fn check_row(
    seq: i64,
    row: &AuditRow,
    (prev_hash, row_hash): (&str, &str),
    predecessor: Option<&str>,
    key: Option<&ChainKey>,
) -> Result<(), ChainBreak> {
    if row_hash.starts_with(KEYED) {
        let Some(key) = key else {
            return Err(ChainBreak::NeedsKey { seq });
        };
        if row.hash_with(seq, prev_hash, Some(key)) != row_hash {
            return Err(ChainBreak::NotKeyedWith { seq });
        }
        return Ok(());
    }
    let predecessor = if seq == 1 { Some(GENESIS) } else { predecessor };
    let Some(predecessor) = predecessor else {
        return Err(ChainBreak::Unanchored { seq });
    };
    Walker::resume(seq - 1, predecessor.to_owned())
        .with_key(key.cloned())
        .push(seq, row, prev_hash, row_hash)
}

/// Names the rows missing between two that are there.
fn gap(after: i64, seq: i64) -> String {
    let (first, last) = (after + 1, seq - 1);
    let missing = if first == last {
        format!("row seq {first} is missing")
    } else {
        format!("rows seq {first} to {last} are missing")
    };
    format!("{missing} (deleted): row seq {after} is followed by row seq {seq}")
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
    /// Rows between `after` and `seq` (both present) are gone.
    #[error("{}", gap(*after, *seq))]
    Gap { after: i64, seq: i64 },
    #[error(
        "the chain starts at row seq {seq}: the rows before it are missing and no retention checkpoint covers them (deleted)"
    )]
    Unanchored { seq: i64 },
    #[error(
        "row seq {seq} does not have the hash that checkpoint row seq {checkpoint} recorded for it"
    )]
    Checkpoint { seq: i64, checkpoint: i64 },
    #[error(
        "row seq {seq}, the first keyed row, does not match its keyed hash: the key is not this chain's, or the row was edited"
    )]
    KeyMismatch { seq: i64 },
    #[error(
        "row seq {seq} does not match its keyed hash: the key is not this chain's, or the row was edited"
    )]
    NotKeyedWith { seq: i64 },
    #[error("row seq {seq} is keyed: pass the chain key (--key-file) to verify it")]
    NeedsKey { seq: i64 },
    #[error("row seq {seq} is not keyed but follows keyed rows (written without the key)")]
    Downgraded { seq: i64 },
    #[error(
        "no row is keyed with the given chain key (the chain was written, or rewritten, without it)"
    )]
    NeverKeyed,
}

/// Checks rows one at a time, in `seq` order, holding only the last row's seq and hash: a
/// chain of any length verifies in constant memory.
#[derive(Clone, Debug)]
pub struct Walker {
    expected_prev: String,
    last_seq: i64,
    count: u64,
    key: Option<ChainKey>,
    keyed: bool,
    keyed_from: Option<i64>,
}

impl Default for Walker {
    fn default() -> Self {
        Self {
            expected_prev: GENESIS.to_owned(),
            last_seq: 0,
            count: 0,
            key: None,
            keyed: false,
            keyed_from: None,
        }
    }
}

impl Walker {
    /// Continues a chain whose rows through `last_seq` are gone (retention), from that row's
    /// hash.
    pub fn resume(last_seq: i64, last_hash: String) -> Self {
        Self {
            // A chain resumed at a keyed hash continues keyed.
            keyed: last_hash.starts_with(KEYED),
            expected_prev: last_hash,
            last_seq,
            ..Self::default()
        }
    }

    /// Checks keyed rows with `key`.
    pub fn with_key(mut self, key: Option<ChainKey>) -> Self {
        self.key = key;
        self
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
        let expected = if row_hash.starts_with(KEYED) {
            let Some(key) = &self.key else {
                return Err(ChainBreak::NeedsKey { seq });
            };
            let expected = row.hash_with(seq, prev_hash, Some(key));
            if self.keyed_from.is_none() {
                if expected != row_hash {
                    return Err(ChainBreak::KeyMismatch { seq });
                }
                self.keyed_from = Some(seq);
            }
            self.keyed = true;
            expected
        } else if self.keyed {
            return Err(ChainBreak::Downgraded { seq });
        } else {
            row.hash(seq, prev_hash)
        };
        if expected != row_hash {
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

    /// The first keyed row this walk checked.
    pub fn keyed_from(&self) -> Option<i64> {
        self.keyed_from
    }

    /// At the end of the chain: with a key, its rows must have been keyed.
    pub fn finish(&self) -> Result<u64, ChainBreak> {
        if self.key.is_some() && !self.keyed && self.count > 0 {
            return Err(ChainBreak::NeverKeyed);
        }
        Ok(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks rows in `seq` order: `(seq, row, prev_hash, row_hash)`.
    pub fn verify<I>(rows: I) -> Result<u64, ChainBreak>
    where
        I: IntoIterator<Item = (i64, AuditRow, String, String)>,
    {
        let mut walker = Walker::default();
        for (seq, row, prev_hash, row_hash) in rows {
            walker.push(seq, &row, &prev_hash, &row_hash)?;
        }
        walker.finish()
    }

    #[test]
    fn a_row_alone_holds_only_where_it_stands() {
        let rows = chain(3);
        let (seq, row, prev, hash) = &rows[1];
        let at = (prev.as_str(), hash.as_str());
        assert_eq!(check_row(*seq, row, at, Some(&rows[0].3), None), Ok(()));
        let (one, first, genesis, first_hash) = &rows[0];
        assert_eq!(
            check_row(*one, first, (genesis, first_hash), None, None),
            Ok(())
        );
        assert_eq!(
            check_row(*seq, row, at, None, None),
            Err(ChainBreak::Unanchored { seq: 2 }),
            "planted far past the head"
        );
        assert!(matches!(
            check_row(*seq, row, at, Some(&rows[2].3), None),
            Err(ChainBreak::Unlinked { .. })
        ));
        let edited = AuditRow {
            body: "{}".into(),
            ..row.clone()
        };
        assert!(matches!(
            check_row(*seq, &edited, at, Some(&rows[0].3), None),
            Err(ChainBreak::Edited { .. })
        ));
        // After a keyed row only keyed rows, and only with the key.
        let key = ChainKey::new(&[7u8; 32]).unwrap();
        let keyed_hash = first.hash_with(1, GENESIS, Some(&key));
        assert_eq!(
            check_row(
                2,
                row,
                (&keyed_hash, &row.hash(2, &keyed_hash)),
                Some(&keyed_hash),
                Some(&key)
            ),
            Err(ChainBreak::Downgraded { seq: 2 })
        );
        let keyed = row.hash_with(2, &keyed_hash, Some(&key));
        let at = (keyed_hash.as_str(), keyed.as_str());
        assert_eq!(check_row(2, row, at, Some(&keyed_hash), Some(&key)), Ok(()));
        assert_eq!(
            check_row(2, row, at, Some(&keyed_hash), None),
            Err(ChainBreak::NeedsKey { seq: 2 })
        );
        let other = ChainKey::new(&[8u8; 32]).unwrap();
        assert!(check_row(2, row, at, Some(&keyed_hash), Some(&other)).is_err());
        assert_eq!(
            check_row(2, row, at, None, Some(&key)),
            Ok(()),
            "a keyed row vouches for itself when the row before it is gone"
        );
    }

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
        assert_eq!(
            ChainBreak::Gap { after: 2, seq: 4 }.to_string(),
            "row seq 3 is missing (deleted): row seq 2 is followed by row seq 4"
        );
        assert_eq!(
            ChainBreak::Gap { after: 2, seq: 6 }.to_string(),
            "rows seq 3 to 5 are missing (deleted): row seq 2 is followed by row seq 6"
        );

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

    /// The row format, pinned by values computed independently (Python's hashlib and hmac over
    /// the same length-prefixed fields): stored chains must keep verifying.
    #[test]
    fn plain_and_keyed_hashes_match_an_independent_computation() {
        let row = AuditRow {
            kind: "decision".into(),
            ref_id: "d1".into(),
            recorded_at_ms: 1_700_000_000_000,
            account_id: "acct-1".into(),
            verdict: "DENY".into(),
            country: "IR".into(),
            reasons: "REGION_SANCTIONED".into(),
            body: "{\"n\":1}".into(),
            ..Default::default()
        };
        assert_eq!(
            row.hash(1, GENESIS),
            "2e3eb5b563c49e52cd6d3ea025d5d0f3c7b05c9c8a918a0c593e7e5eac62a9c9"
        );
        let key = ChainKey::new(&[b'k'; 32]).unwrap();
        assert_eq!(
            row.hash_with(1, GENESIS, Some(&key)),
            "k1:e024cd5dc8d2d9084172c48fdaba935019d1933e2d00e163cdda55f7b887bafc"
        );
        assert!(ChainKey::new(b"short").is_err());
        assert_eq!(format!("{key:?}"), "ChainKey(<redacted>)");
    }

    #[test]
    fn a_keyed_chain_needs_its_key_and_allows_no_downgrade() {
        let key = ChainKey::new(&[7; 32]).unwrap();
        let other = ChainKey::new(&[8; 32]).unwrap();
        // Two plain rows (written before the key was configured), then three keyed ones.
        let mut prev = GENESIS.to_owned();
        let rows: Vec<_> = (1..=5)
            .map(|seq| {
                let row = AuditRow {
                    kind: "decision".into(),
                    ref_id: format!("d{seq}"),
                    ..Default::default()
                };
                let hash = row.hash_with(seq, &prev, (seq > 2).then_some(&key));
                let entry = (seq, row, prev.clone(), hash.clone());
                prev = hash;
                entry
            })
            .collect();
        let walk = |rows: &[(i64, AuditRow, String, String)], key: Option<&ChainKey>| {
            let mut walker = Walker::default().with_key(key.cloned());
            for (seq, row, prev, hash) in rows {
                walker.push(*seq, row, prev, hash)?;
            }
            walker.finish()
        };
        assert_eq!(walk(&rows, Some(&key)), Ok(5));
        assert_eq!(walk(&rows, None), Err(ChainBreak::NeedsKey { seq: 3 }));
        assert_eq!(
            walk(&rows, Some(&other)),
            Err(ChainBreak::KeyMismatch { seq: 3 })
        );
        // Without the key, a row can only be appended plain: refused after keyed rows.
        let mut appended = rows.clone();
        let forged = AuditRow {
            kind: "review".into(),
            ..Default::default()
        };
        let hash = forged.hash(6, &prev);
        appended.push((6, forged, prev.clone(), hash));
        assert_eq!(
            walk(&appended, Some(&key)),
            Err(ChainBreak::Downgraded { seq: 6 })
        );
        // Rewriting the whole chain plain is caught by the key's absence.
        assert_eq!(walk(&chain(3), Some(&key)), Err(ChainBreak::NeverKeyed));
        assert_eq!(walk(&chain(3), None), Ok(3));
    }
}
