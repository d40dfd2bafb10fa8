-- regionguard store, schema version 6: two index entries fewer to write per decision row.
-- audit_log_verdict (verdict, seq) served no query (the queue has its own table; verify scans the
-- log whole). audit_log_kind is asked only for the rows that are not decisions (retention's
-- checkpoints, reviewers' actions), so it now holds only those: queries using it name
-- `kind <> 'decision'`, the index's own condition, so that SQLite can choose it.
DROP INDEX audit_log_verdict;
DROP INDEX audit_log_kind;
CREATE INDEX audit_log_kind ON audit_log(kind, seq) WHERE kind <> 'decision';
