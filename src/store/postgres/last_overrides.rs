//! The overrides this replica last read from PostgreSQL, kept beside its spool, so that a
//! replica that starts while the database is unreachable enforces them rather than none.
//!
//! Written whole (to a temporary file, fsynced, then renamed over the old copy) at every start
//! with the database there and at every resync of the override listener, so a crash leaves
//! the old copy or the new one, never a torn one. Read only at a start without the database;
//! the listener replaces what it gave the engine as soon as the database answers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::store::OverrideRecord;

const FILE: &str = "regionguard-overrides.json";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Replaces the copy in `dir` with `overrides`.
pub(super) fn save(dir: &Path, overrides: &[OverrideRecord]) -> std::io::Result<()> {
    let body = serde_json::to_vec(overrides).map_err(std::io::Error::other)?;
    let target = path(dir);
    let partial = dir.join(format!("{FILE}.partial"));
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(&body)?;
    file.sync_data()?;
    drop(file);
    std::fs::rename(&partial, &target)?;
    // The rename itself survives a crash once the directory is synced.
    std::fs::File::open(dir)?.sync_all()
}

/// The copy in `dir` and when it was written; `None` if there is none.
pub(super) fn load(dir: &Path) -> Result<Option<(Vec<OverrideRecord>, SystemTime)>, String> {
    let target = path(dir);
    let bytes = match std::fs::read(&target) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(format!("{}: {error}", target.display())),
    };
    let overrides =
        serde_json::from_slice(&bytes).map_err(|error| format!("{}: {error}", target.display()))?;
    let written = std::fs::metadata(&target)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(Some((overrides, written)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> OverrideRecord {
        OverrideRecord {
            id: id.into(),
            scope: "network".into(),
            value: "2.125.160.216/32".into(),
            action: "DENY".into(),
            reviewer: "ana".into(),
            reason: "case 12".into(),
            created_at_ms: 1_700_000_000_000,
            expires_at_ms: None,
            removed_at_ms: None,
            removed_by: String::new(),
        }
    }

    #[test]
    fn a_saved_copy_loads_as_it_was_and_a_new_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        save(dir.path(), &[record("a"), record("b")]).unwrap();
        save(dir.path(), &[record("c")]).unwrap();
        let (overrides, _) = load(dir.path()).unwrap().unwrap();
        assert_eq!(overrides, vec![record("c")]);
        assert!(!dir.path().join(format!("{FILE}.partial")).exists());
    }

    #[test]
    fn a_damaged_copy_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"[{\"id\":").unwrap();
        let error = load(dir.path()).unwrap_err();
        assert!(error.contains(FILE), "{error}");
    }
}
