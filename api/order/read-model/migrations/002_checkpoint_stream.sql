-- Which incarnation of the history stream a checkpoint's position belongs to (the stream's
-- creation time as nats-server reports it). A stream made again under the same name restarts its
-- sequences at 1; the projector compares this with the stream and rebuilds the read model when
-- they differ. Null on checkpoints written before this column: adopted at the next start when the
-- position is within the stream.
alter table projection_checkpoints add column stream_created text;
