-- Cheap on a large table: nullable columns without defaults are added without rewriting it, and
-- no constraint is added (each would be checked against every row). Pods of the previous version
-- keep running beside this one during a rolling update and know none of these columns: nothing
-- here may refuse what they write (a failed row without failed_at, a delivered row whose failed_at
-- new code set), or their updates fail and events are retried and notified again.

-- A delivery claims its row for a short lease before sending, so that a second copy of the event
-- racing it does not send too (see claim in store.ts); null or past = unclaimed. The token says
-- whose claim it is: only the holder may end it by failing (a delivery that outlived its lease
-- must not clear the claim of the one that took over).
alter table notifications add column claimed_until timestamptz;
alter table notifications add column claim_token text;

-- When the row became failed, as far as this version knows: null on rows that failed before this
-- migration or were failed by a pod of the previous version. The pruner ages failed rows by
-- coalesce(failed_at, created_at) (creation is the closest bound then; pruning such a row early
-- is harmless, a failed row holds back no repeat), and ignores failed_at on any other status.
alter table notifications add column failed_at timestamptz;

-- What the pruner (workers/notification/pruner.ts) deletes by age, found without scanning the
-- table. Building them locks out inserts for the build: on a large existing table, create them
-- first with `create index concurrently` (same names and definitions), and these do nothing.
create index if not exists notifications_delivered_at on notifications (delivered_at)
  where delivered_at is not null;
create index if not exists notifications_failed_age on notifications (coalesce(failed_at, created_at))
  where status = 'failed';
