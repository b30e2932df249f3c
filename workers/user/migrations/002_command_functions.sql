-- Each saga command is ONE statement: a function that takes the command's advisory lock, returns
-- the stored reply when the command was carried out before, else applies the effect and stores its
-- reply, all in the statement's own transaction. Before, the same steps were a transaction of six
-- to eight round trips, and on small machines each statement's socket write and wake-up of the
-- backend cost more than its SQL (see docs/BENCHMARKS.md).
--
-- Why it is safe under READ COMMITTED: a VOLATILE function takes a fresh snapshot for each query
-- it runs, so the reply lookup after the lock sees a twin delivery that committed while this one
-- waited for the lock, exactly as the separate statements did.
--
-- Refusals that must leave no trace (unknown user, a reservation id reused for another user or
-- amount) return {"error": CODE, "message": …} before anything is written; the store turns them
-- into UserStoreError.

-- The stored reply of a command, after taking its lock (class 1970496882 = "user" in ASCII, clear
-- of other advisory locks). Null when the command has not been carried out yet.
create function user_command_reply(p_command_id text) returns jsonb
language plpgsql volatile as $$
declare
  v_reply jsonb;
begin
  perform pg_advisory_xact_lock(1970496882, hashtext(p_command_id));
  select reply into v_reply from processed_commands where command_id = p_command_id;
  return v_reply;
end
$$;

create function user_verify(p_command_id text, p_user_id text) returns jsonb
language plpgsql volatile as $$
declare
  v_reply jsonb := user_command_reply(p_command_id);
begin
  if v_reply is not null then
    return v_reply;
  end if;
  if exists (select 1 from users where user_id = p_user_id) then
    v_reply := jsonb_build_object('type', 'user.verified', 'userId', p_user_id);
  else
    v_reply := jsonb_build_object('type', 'user.rejected', 'userId', p_user_id, 'reason', 'unknown user');
  end if;
  insert into processed_commands (command_id, reply) values (p_command_id, v_reply);
  return v_reply;
end
$$;

create function user_reserve_credit(
  p_command_id text, p_user_id text, p_reservation_id text, p_amount_cents bigint
) returns jsonb
language plpgsql volatile as $$
declare
  v_reply jsonb := user_command_reply(p_command_id);
  v_existing credit_reservations%rowtype;
  v_available bigint;
begin
  if v_reply is not null then
    return v_reply;
  end if;
  -- Claim the reservation id first: a concurrent claim (or release marker) of the same id waits on
  -- the primary key until that transaction ends, so an id is held at most once.
  insert into credit_reservations (reservation_id, user_id, amount_cents, status)
  select p_reservation_id, p_user_id, p_amount_cents, 'held'
  where exists (select 1 from users where user_id = p_user_id)
  on conflict (reservation_id) do nothing;
  if not found then
    select * into v_existing from credit_reservations where reservation_id = p_reservation_id;
    if not found then
      return jsonb_build_object('error', 'NOT_FOUND', 'message', format('unknown user %s', p_user_id));
    end if;
    if v_existing.user_id <> p_user_id
      or (v_existing.status = 'held' and v_existing.amount_cents <> p_amount_cents) then
      return jsonb_build_object('error', 'RESERVATION_CONFLICT', 'message',
        format('reservation %s is already used for another user or amount', p_reservation_id));
    end if;
    v_available := coalesce((select available_cents from users where user_id = p_user_id), 0);
    v_reply := jsonb_build_object(
      'type', case when v_existing.status = 'held' then 'credit.reserved' else 'credit.insufficient' end,
      'reservationId', p_reservation_id, 'amountCents', p_amount_cents, 'availableCents', v_available);
  else
    -- Atomic check-and-debit: concurrent debits queue on the row lock and each re-checks the
    -- balance, so it never goes negative (the table's check constraint backs this up).
    update users set available_cents = available_cents - p_amount_cents
    where user_id = p_user_id and available_cents >= p_amount_cents
    returning available_cents into v_available;
    if found then
      v_reply := jsonb_build_object('type', 'credit.reserved', 'reservationId', p_reservation_id,
        'amountCents', p_amount_cents, 'availableCents', v_available);
    else
      -- Nothing held: drop the claim so the same reservation id may be tried again later.
      delete from credit_reservations where reservation_id = p_reservation_id;
      v_available := coalesce((select available_cents from users where user_id = p_user_id), 0);
      v_reply := jsonb_build_object('type', 'credit.insufficient', 'reservationId', p_reservation_id,
        'amountCents', p_amount_cents, 'availableCents', v_available);
    end if;
  end if;
  insert into processed_commands (command_id, reply) values (p_command_id, v_reply);
  return v_reply;
end
$$;

create function user_release_credit(p_command_id text, p_user_id text, p_reservation_id text) returns jsonb
language plpgsql volatile as $$
declare
  v_reply jsonb := user_command_reply(p_command_id);
  v_amount bigint := 0;
begin
  if v_reply is not null then
    return v_reply;
  end if;
  -- A release that overtakes its reservation leaves a released marker behind.
  insert into credit_reservations (reservation_id, user_id, amount_cents, status, released_at)
  select p_reservation_id, p_user_id, 0, 'released', now()
  where exists (select 1 from users where user_id = p_user_id)
  on conflict (reservation_id) do nothing;
  if not found then
    update credit_reservations set status = 'released', released_at = now()
    where reservation_id = p_reservation_id and user_id = p_user_id and status = 'held'
    returning amount_cents into v_amount;
    if found then
      update users set available_cents = available_cents + v_amount where user_id = p_user_id;
    else
      v_amount := 0;
    end if;
  end if;
  v_reply := jsonb_build_object('type', 'credit.released', 'reservationId', p_reservation_id,
    'amountCents', v_amount);
  insert into processed_commands (command_id, reply) values (p_command_id, v_reply);
  return v_reply;
end
$$;
