-- regionguard store, schema version 2: indexes for retention.
-- Retention deletes queue items by the seq of their decision row, a chunk at a time.
CREATE INDEX review_queue_seq ON review_queue(seq);
-- Checkpoints and reviewer rows are found by kind, in seq order.
CREATE INDEX audit_log_kind ON audit_log(kind, seq);
