-- regionguard store, schema version 4: the fleet a queued decision's account was in, so the queue
-- can be searched by fleet id (ListQueue fleet_id). Derived from the decision row's body (its
-- inputs.usage.fleet.id) when the row is queued; outside the chain, like decision_counts.
ALTER TABLE review_queue ADD COLUMN fleet_id TEXT NOT NULL DEFAULT '';
-- The items queued before this version.
UPDATE review_queue SET fleet_id = coalesce((
    SELECT json_extract(a.body, '$.inputs.usage.fleet.id') FROM audit_log a
    WHERE a.seq = review_queue.seq AND json_valid(a.body)
), '');
CREATE INDEX review_queue_fleet ON review_queue(fleet_id, seq) WHERE fleet_id <> '';
