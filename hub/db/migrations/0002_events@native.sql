-- Events, native declarative partitioning by day on the device time.
-- The maintenance task creates daily partitions ahead and drops those past retention;
-- an event outside every daily partition (a device clock far off, a gateway that was
-- offline for weeks) lands in events_default and is moved when its day is created.
CREATE TABLE events (
    id            uuid        NOT NULL,
    time          timestamptz NOT NULL,
    gateway_time  timestamptz,
    received_at   timestamptz NOT NULL,
    gateway_id    text        NOT NULL,
    device_id     text        NOT NULL,
    device_type   text        NOT NULL,
    kind          text        NOT NULL,
    payload       jsonb       NOT NULL,
    -- Idempotency: a redelivered event has the same id and the same device time.
    PRIMARY KEY (id, time)
) PARTITION BY RANGE (time);

CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE INDEX events_device_time_idx ON events (gateway_id, device_id, time DESC);
CREATE INDEX events_kind_time_idx ON events (kind, time DESC);
