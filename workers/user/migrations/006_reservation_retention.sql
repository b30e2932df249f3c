-- Released credit reservations are pruned by age like processed commands (workers/user/pruner.ts):
-- found without scanning the table. Held ones (released_at null) are never pruned.
-- Building it locks out inserts into the table for the build. On a large existing database,
-- create it first with `create index concurrently` (same name): this then does nothing.
create index if not exists credit_reservations_released_at on credit_reservations (released_at)
  where released_at is not null;
