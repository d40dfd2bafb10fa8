-- regionguard store on PostgreSQL, schema version 1: the tables and columns of the SQLite store
-- (migrations/0001_init.sql and 0002), shared by every replica.
-- audit_log is the tamper-evident chain: every decision and every reviewer action of every
-- replica, each row hashed together with the previous row's hash (src/store/chain.rs). One
-- chain: each writer takes pg_advisory_xact_lock before it reads the head and appends, so rows
-- are chained in seq order (src/store/postgres/writer.rs). Rows are only appended.
CREATE TABLE audit_log (
    seq            BIGINT  PRIMARY KEY,
    kind           TEXT    NOT NULL,            -- 'decision' | 'review' | 'keying'
    ref_id         TEXT    NOT NULL,            -- decision_id, or the review action's id
    recorded_at_ms BIGINT  NOT NULL,
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
CREATE INDEX audit_log_kind ON audit_log(kind, seq);

-- The review queue: one item per REVIEW decision.
CREATE TABLE review_queue (
    decision_id    TEXT    PRIMARY KEY,
    seq            BIGINT  NOT NULL,
    status         TEXT    NOT NULL DEFAULT 'open',   -- 'open' | 'resolved'
    outcome        TEXT    NOT NULL DEFAULT '',
    note           TEXT    NOT NULL DEFAULT '',
    resolved_by    TEXT    NOT NULL DEFAULT '',
    resolved_at_ms BIGINT
);
CREATE INDEX review_queue_status ON review_queue(status, seq);
CREATE INDEX review_queue_seq ON review_queue(seq);

-- Reviewer overrides (creation and removal are also logged in audit_log). A change is
-- announced with NOTIFY regionguard_overrides in the transaction that makes it.
CREATE TABLE overrides (
    id             TEXT    PRIMARY KEY,
    scope          TEXT    NOT NULL,            -- 'account' | 'domain' | 'network'
    value          TEXT    NOT NULL,
    action         TEXT    NOT NULL,            -- 'ALLOW' | 'DENY'
    reviewer       TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    created_at_ms  BIGINT  NOT NULL,
    expires_at_ms  BIGINT,
    removed_at_ms  BIGINT,
    removed_by     TEXT    NOT NULL DEFAULT ''
);
