-- regionguard store, schema version 5: an account's rows are found through audit_account, which
-- the writer fills in sorted batches, instead of an index on audit_log that every commit had to
-- update at a page of its own per row (account ids are spread over the index, and a commit
-- writes each page it dirtied whole to the WAL: about 4 KB of WAL a row, more than the row).
-- Rows after audit_account_through.seq may not be in audit_account yet; readers look for them
-- in audit_log itself (a short tail, by seq). Derived data, outside the chain, like
-- decision_counts; retention deletes an entry with its row.
CREATE TABLE audit_account (
    account_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (account_id, seq)
) WITHOUT ROWID;
CREATE TABLE audit_account_through (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
-- The rows recorded before this version.
INSERT INTO audit_account (account_id, seq)
    SELECT account_id, seq FROM audit_log WHERE account_id <> '' ORDER BY account_id, seq;
INSERT INTO audit_account_through (id, seq) VALUES (1, (SELECT coalesce(max(seq), 0) FROM audit_log));
DROP INDEX audit_log_account;
