-- The outbox relay's batch (CLAIM_BATCH_SQL in workers/user/outbox-relay.ts) is two index scans
-- that see only rows it takes: rows never tried, in id order, and rows whose pause after a failed
-- publish is over, by next_attempt_at. Through `outbox_unpublished` alone it walked every
-- unpublished row, those still backing off too, on every pass (every 200 ms on each replica).
-- `outbox_unpublished` stays while pods of the previous version (which query through it) may run;
-- a later migration can drop it.
-- Building them locks out inserts into the table for the build. On a large existing database,
-- create them first with `create index concurrently` (same names): these then do nothing.
create index if not exists outbox_unpublished_new on outbox (id)
  where published_at is null and next_attempt_at is null;
create index if not exists outbox_unpublished_retry on outbox (next_attempt_at)
  where published_at is null and next_attempt_at is not null;

-- No query reads credit reservations by user (each is found by its reservation id, the primary
-- key): the index only cost a write per reservation and per release. Nothing old pods run uses it.
drop index if exists credit_reservations_user_held;
