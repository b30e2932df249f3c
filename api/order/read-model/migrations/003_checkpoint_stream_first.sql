-- When the first message of the history stream's incarnation was stored (`StreamInfo.state.first_ts`
-- as nats-server reports it). nats-server has reported a changed creation time for a stream that was
-- not made again; the history stream never loses a message, so an unchanged first message tells
-- that it is still the same stream, and the new creation time is adopted without a rebuild (see
-- api/order/read-model/stream-identity.ts). Null while not known (the stream was empty): a changed
-- creation time then rebuilds, as before this column.
alter table projection_checkpoints add column stream_first_ts text;
