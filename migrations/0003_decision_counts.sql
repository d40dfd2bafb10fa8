-- regionguard store, schema version 3: decision counts for the review console's dashboard.
-- One row per hour (UTC, hour_ms = its first millisecond), verdict and country: reason = '' counts
-- decisions; reason = a code counts the decisions that gave it. Kept by the writer in the
-- transaction of the rows it counts, so the dashboard reads a few thousand rows, not the log.
-- Derived data, outside the chain; retention prunes it with the rows.
CREATE TABLE decision_counts (
    hour_ms  INTEGER NOT NULL,
    verdict  TEXT    NOT NULL,
    country  TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (hour_ms, verdict, country, reason)
) WITHOUT ROWID;
-- The rows recorded before this version.
INSERT INTO decision_counts (hour_ms, verdict, country, reason, n)
    SELECT (recorded_at_ms / 3600000) * 3600000, verdict, country, '', COUNT(*)
    FROM audit_log WHERE kind = 'decision' GROUP BY 1, 2, 3;
WITH RECURSIVE split(hour_ms, verdict, country, reason, rest) AS (
    SELECT (recorded_at_ms / 3600000) * 3600000, verdict, country, '', reasons || ','
    FROM audit_log WHERE kind = 'decision' AND reasons <> ''
    UNION ALL
    SELECT hour_ms, verdict, country, substr(rest, 1, instr(rest, ',') - 1), substr(rest, instr(rest, ',') + 1)
    FROM split WHERE rest <> ''
)
INSERT INTO decision_counts (hour_ms, verdict, country, reason, n)
    SELECT hour_ms, verdict, country, reason, COUNT(*) FROM split WHERE reason <> '' GROUP BY 1, 2, 3, 4;
