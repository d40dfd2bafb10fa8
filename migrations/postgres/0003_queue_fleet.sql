-- regionguard store on PostgreSQL, schema version 3: the fleet a queued decision's account was
-- in, as migrations/0004_queue_fleet.sql on SQLite (ListQueue fleet_id). Derived from the
-- decision row's body when the row is queued; outside the chain.
ALTER TABLE review_queue ADD COLUMN fleet_id TEXT NOT NULL DEFAULT '';
-- The items queued before this version (bodies are the JSON the writer wrote; `json`, not
-- `jsonb`, only checks the syntax, so no body the writer could write stops the migration).
UPDATE review_queue q SET fleet_id = coalesce(a.body::json #>> '{inputs,usage,fleet,id}', '')
    FROM audit_log a WHERE a.seq = q.seq AND a.body LIKE '%"fleet":{%';
CREATE INDEX review_queue_fleet ON review_queue(fleet_id, seq) WHERE fleet_id <> '';
