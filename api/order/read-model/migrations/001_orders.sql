-- The order read model: projected from the order sagas' histories (stream <NS>_HISTORY, subjects
-- <ns>.history.order.<orderId>.<phase>). Every value is derived from history entries only (no now(), no
-- sequences), so a rebuild from the stream reproduces these rows exactly.

create table orders (
  order_id text primary key,
  user_id text not null,
  -- Business status shown by the API; the saga's own state is kept in saga_state.
  status text not null check (status in ('PENDING', 'CONFIRMED', 'SHIPPED', 'CANCELLED')),
  saga_state text not null,
  total_cents bigint not null check (total_cents >= 0),
  cancel_reason text,
  tracking_id text,
  created_at timestamptz not null,
  updated_at timestamptz not null,
  -- History revision this row reflects: an entry with a revision not above it changes nothing.
  revision integer not null check (revision > 0),
  -- History stream sequence of that entry.
  history_seq bigint not null
);

-- Every query filters by user and pages newest first by (created_at, order_id).
create index orders_user_created_idx on orders (user_id, created_at desc, order_id desc);
create index orders_user_status_created_idx on orders (user_id, status, created_at desc, order_id desc);

create table order_items (
  order_id text not null references orders (order_id) on delete cascade,
  line_no integer not null check (line_no >= 0),
  sku text not null,
  quantity integer not null check (quantity > 0),
  unit_price_cents bigint not null check (unit_price_cents >= 0),
  primary key (order_id, line_no)
);

-- One row per accepted event of an order's saga, with the status it led to.
create table order_status_history (
  order_id text not null references orders (order_id) on delete cascade,
  revision integer not null,
  status text not null,
  saga_state text not null,
  event_type text not null,
  at timestamptz not null,
  history_seq bigint not null,
  primary key (order_id, revision)
);

-- How far each projection got: the history stream sequence of the last entry it applied,
-- written in the same transaction as the rows that entry produced.
create table projection_checkpoints (
  name text primary key,
  position bigint not null check (position >= 0)
);
