-- A row that fails to publish is tried again later, with growing pauses, instead of at the head of
-- every batch: rows that can never be published (a subject no stream takes) no longer stall the
-- ones behind them. `last_error` tells operators why a row is stuck.
alter table outbox
  add column attempts integer not null default 0,
  add column last_error text,
  add column next_attempt_at timestamptz;
