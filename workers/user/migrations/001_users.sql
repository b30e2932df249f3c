-- The user service's own tables. Amounts are integer cents.

create table users (
  user_id text primary key,
  -- Stored lowercased by the store, so the unique constraint is case-insensitive in effect.
  email text not null unique check (email = lower(email)),
  password_hash text not null,
  credit_limit_cents bigint not null check (credit_limit_cents >= 0),
  -- The invariant that makes over-reservation impossible: the balance can never leave [0, limit].
  available_cents bigint not null check (available_cents >= 0 and available_cents <= credit_limit_cents),
  created_at timestamptz not null default now()
);

-- One row per reservation id, so a reservation id can hold credit at most once.
create table credit_reservations (
  reservation_id text primary key,
  user_id text not null references users (user_id),
  amount_cents bigint not null check (amount_cents >= 0),
  status text not null check (status in ('held', 'released')),
  created_at timestamptz not null default now(),
  released_at timestamptz,
  check ((status = 'released') = (released_at is not null))
);
create index credit_reservations_user_held on credit_reservations (user_id) where status = 'held';

-- The reply of every command already carried out, written in the same transaction as its effect:
-- a redelivered command gets the same reply and no second effect.
create table processed_commands (
  command_id text primary key,
  reply jsonb not null,
  processed_at timestamptz not null default now()
);

-- Domain events (e.g. user.created) written with the change that caused them, published later.
create table outbox (
  id bigserial primary key,
  subject text not null,
  msg_id text not null unique,
  payload jsonb not null,
  created_at timestamptz not null default now(),
  published_at timestamptz
);
create index outbox_unpublished on outbox (id) where published_at is null;
