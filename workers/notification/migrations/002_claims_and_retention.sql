-- A delivery claims its row for a short lease before sending, so that a second copy of the event
-- racing it does not send too (see claim in store.ts); null or past = unclaimed.
alter table notifications add column claimed_until timestamptz;

-- When the row became failed: what the pruner ages failed rows by (delivered ones by delivered_at).
alter table notifications add column failed_at timestamptz;
-- The moment rows failed before this migration is unknown; creation is the closest bound we have.
-- Pruning one of them early is harmless: a failed row holds back no repeat (a replay retries anyway).
update notifications set failed_at = created_at where status = 'failed';
alter table notifications
  add constraint notifications_failed_at check ((status = 'failed') = (failed_at is not null));

-- The pruner's `delivered_at < $cutoff` / `failed_at < $cutoff` imply these predicates (the
-- comparison is false on null), so each batch reads only the oldest finished rows.
create index notifications_delivered_at on notifications (delivered_at) where delivered_at is not null;
create index notifications_failed_at on notifications (failed_at) where failed_at is not null;
