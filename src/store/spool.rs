//! The local spool: decision rows that must be kept (signup, login, every non-ALLOW) while the
//! PostgreSQL store cannot be reached, one JSON line per row in `data_dir`, drained in order
//! when the database is back.
//!
//! Durability: every append is written and `fsync`ed (`sync_data`) before the writer takes its
//! next batch, so a spooled row survives a crash of the process and of the machine. A line
//! torn by a crash in the middle of an append is cut off when the spool is next opened (that
//! row was never acknowledged as spooled to anyone: it was the batch being written). Rows
//! carry no seq or hash: they are chained when they reach the database, in spool order.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{AuditRow, StoreError};

const FILE: &str = "regionguard-spool.jsonl";

pub struct Spool {
    path: PathBuf,
    file: File,
    /// Rows in the file not yet drained.
    rows: u64,
    /// Where the next row to drain starts.
    offset: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Dir {
        path: path.display().to_string(),
        error,
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, cutting off a torn last line.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(FILE);
        let err = io(&path);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(&err)?;
        let mut rows = 0u64;
        let mut complete = 0u64;
        let mut reader = BufReader::new(File::open(&path).map_err(&err)?);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(&err)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                break; // torn
            }
            complete += n as u64;
            rows += 1;
        }
        let len = file.metadata().map_err(&err)?.len();
        if len > complete {
            tracing::warn!(path = %path.display(), bytes = len - complete, "spool: cutting off a line torn by a crash while it was written");
            file.set_len(complete).map_err(&err)?;
            file.sync_data().map_err(&err)?;
        }
        drop(err);
        Ok(Self {
            path,
            file,
            rows,
            offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows waiting to be drained.
    pub fn len(&self) -> u64 {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends `rows` and syncs them to disk before returning.
    pub fn append(&mut self, rows: &[AuditRow]) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(rows.len() * 2048);
        for row in rows {
            serde_json::to_writer(&mut buf, row).map_err(|e| {
                StoreError::Conflict(format!("spool: row {} cannot be written: {e}", row.ref_id))
            })?;
            buf.push(b'\n');
        }
        let err = io(&self.path);
        self.file.write_all(&buf).map_err(&err)?;
        self.file.sync_data().map_err(&err)?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Up to `max` rows from the front, with the bytes they take (pass them to `advance` once
    /// the rows are committed). A line that cannot be read as a row is logged and skipped (it
    /// counts in the bytes, not in the rows).
    pub fn peek(&self, max: usize) -> Result<(Vec<AuditRow>, u64, u64), StoreError> {
        let err = io(&self.path);
        let mut file = File::open(&self.path).map_err(&err)?;
        file.seek(SeekFrom::Start(self.offset)).map_err(&err)?;
        let mut reader = BufReader::new(file);
        let (mut rows, mut bytes, mut lines) = (Vec::new(), 0u64, 0u64);
        let mut line = Vec::new();
        while rows.len() < max {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(&err)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            bytes += n as u64;
            lines += 1;
            match serde_json::from_slice::<AuditRow>(&line) {
                Ok(row) => rows.push(row),
                Err(error) => {
                    tracing::error!(%error, path = %self.path.display(), offset = self.offset + bytes - n as u64, "spool: a line is not a row; it is skipped")
                }
            }
        }
        Ok((rows, bytes, lines))
    }

    /// Marks `lines` rows taking `bytes` as drained; an empty spool is truncated.
    pub fn advance(&mut self, bytes: u64, lines: u64) -> Result<(), StoreError> {
        self.offset += bytes;
        self.rows = self.rows.saturating_sub(lines);
        if self.rows == 0 {
            let err = io(&self.path);
            self.file.set_len(0).map_err(&err)?;
            self.file.sync_data().map_err(&err)?;
            self.offset = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> AuditRow {
        AuditRow {
            kind: "decision".into(),
            ref_id: id.into(),
            verdict: "DENY".into(),
            body: "{\"a\":1}".into(),
            ..Default::default()
        }
    }

    #[test]
    fn rows_come_back_in_order_and_survive_reopening_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.append(&[row("a"), row("b")]).unwrap();
        spool.append(&[row("c")]).unwrap();
        drop(spool);
        // A crash in the middle of an append leaves a torn line.
        let path = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"kind\":\"deci").unwrap();
        drop(f);
        let mut spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.len(), 3);
        let (rows, bytes, lines) = spool.peek(2).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.ref_id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        spool.advance(bytes, lines).unwrap();
        assert_eq!(spool.len(), 1);
        spool.append(&[row("d")]).unwrap();
        let (rows, bytes, lines) = spool.peek(10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.ref_id.as_str()).collect::<Vec<_>>(),
            ["c", "d"]
        );
        spool.advance(bytes, lines).unwrap();
        assert!(spool.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
