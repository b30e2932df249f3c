-- Authenticate's per-email token buckets, shared by every replica of the user service (an
-- in-memory bucket per process allowed the budget once per replica). Rows idle for an hour are
-- full again and are pruned (workers/user/pruner.ts).
create table auth_rate_limits (
  key text primary key,
  tokens double precision not null,
  updated_at timestamptz not null
);
create index auth_rate_limits_updated_at on auth_rate_limits (updated_at);
