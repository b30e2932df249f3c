-- What the pruner (workers/user/pruner.ts) deletes by age, found without scanning the tables.
create index processed_commands_processed_at on processed_commands (processed_at);
create index outbox_published_at on outbox (published_at) where published_at is not null;
