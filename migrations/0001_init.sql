-- regionguard store, schema version 1.
-- audit_log is the tamper-evident chain: every decision and every reviewer action, each row
-- hashed together with the previous row's hash (see src/store/chain.rs). Rows are only appended.
CREATE TABLE audit_log (
    seq            INTEGER PRIMARY KEY,
    kind           TEXT    NOT NULL,            -- 'decision' | 'review'
    ref_id         TEXT    NOT NULL,            -- decision_id, or the review action's id
    recorded_at_ms INTEGER NOT NULL,
    actor          TEXT    NOT NULL,            -- reviewer identity for review rows
    account_id     TEXT    NOT NULL,
    verdict        TEXT    NOT NULL,
    country        TEXT    NOT NULL,
    reasons        TEXT    NOT NULL,            -- comma-separated reason codes
    body           TEXT    NOT NULL,            -- JSON: inputs, location, reasons with evidence
    prev_hash      TEXT    NOT NULL,
    row_hash       TEXT    NOT NULL
);
CREATE UNIQUE INDEX audit_log_ref ON audit_log(kind, ref_id);
CREATE INDEX audit_log_account ON audit_log(account_id, seq);
CREATE INDEX audit_log_verdict ON audit_log(verdict, seq);

-- The review queue: one item per REVIEW decision; its state changes (resolution is also logged
-- in audit_log as a review row).
CREATE TABLE review_queue (
    decision_id    TEXT    PRIMARY KEY,
    seq            INTEGER NOT NULL,
    status         TEXT    NOT NULL DEFAULT 'open',   -- 'open' | 'resolved'
    outcome        TEXT    NOT NULL DEFAULT '',
    note           TEXT    NOT NULL DEFAULT '',
    resolved_by    TEXT    NOT NULL DEFAULT '',
    resolved_at_ms INTEGER
);
CREATE INDEX review_queue_status ON review_queue(status, seq);

-- Reviewer overrides (creation and removal are also logged in audit_log).
CREATE TABLE overrides (
    id             TEXT    PRIMARY KEY,
    scope          TEXT    NOT NULL,            -- 'account' | 'domain' | 'network'
    value          TEXT    NOT NULL,
    action         TEXT    NOT NULL,            -- 'ALLOW' | 'DENY'
    reviewer       TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    expires_at_ms  INTEGER,
    removed_at_ms  INTEGER,
    removed_by     TEXT    NOT NULL DEFAULT ''
);
