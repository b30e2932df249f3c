-- One row per domain event: the primary key on event_id makes a redelivered event a no-op insert.
create table notifications (
  event_id text primary key,
  order_id text not null,
  user_id text not null,
  kind text not null,
  channel text not null,
  message text not null,
  status text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
  attempts integer not null default 0 check (attempts >= 0),
  last_error text,
  created_at timestamptz not null default now(),
  delivered_at timestamptz,
  check ((status = 'delivered') = (delivered_at is not null))
);
create index notifications_pending on notifications (created_at) where status <> 'delivered';
