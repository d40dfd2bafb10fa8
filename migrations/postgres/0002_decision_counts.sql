-- regionguard store on PostgreSQL, schema version 2: decision counts for the review console's
-- dashboard, as migrations/0003_decision_counts.sql on SQLite. One row per hour (UTC), verdict
-- and country: reason = '' counts decisions; reason = a code counts the decisions that gave it.
-- Kept by the writer in the transaction of the rows it counts (under the chain lock, so the
-- replicas' updates serialise); derived data, outside the chain.
CREATE TABLE decision_counts (
    hour_ms  BIGINT  NOT NULL,
    verdict  TEXT    NOT NULL,
    country  TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    n        BIGINT  NOT NULL,
    PRIMARY KEY (hour_ms, verdict, country, reason)
);
INSERT INTO decision_counts (hour_ms, verdict, country, reason, n)
    SELECT (recorded_at_ms / 3600000) * 3600000, verdict, country, '', COUNT(*)
    FROM audit_log WHERE kind = 'decision' GROUP BY 1, 2, 3;
INSERT INTO decision_counts (hour_ms, verdict, country, reason, n)
    SELECT (recorded_at_ms / 3600000) * 3600000, verdict, country, reason, COUNT(*)
    FROM audit_log, unnest(string_to_array(reasons, ',')) AS reason
    WHERE kind = 'decision' AND reasons <> '' AND reason <> '' GROUP BY 1, 2, 3, 4;
