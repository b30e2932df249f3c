-- What the pruner (workers/user/pruner.ts) deletes by age, found without scanning the tables.
-- Building them locks out inserts into the tables for the build. On a large existing database,
-- create them first with `create index concurrently` (same names): these then do nothing.
create index if not exists processed_commands_processed_at on processed_commands (processed_at);
create index if not exists outbox_published_at on outbox (published_at) where published_at is not null;
