-- Events as a TimescaleDB hypertable with daily chunks and compression.
-- Retention is applied from settings by the hub (add_retention_policy) at start.
CREATE EXTENSION IF NOT EXISTS timescaledb;

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
    PRIMARY KEY (id, time)
);

SELECT create_hypertable('events', 'time', chunk_time_interval => INTERVAL '1 day');

CREATE INDEX events_device_time_idx ON events (gateway_id, device_id, time DESC);
CREATE INDEX events_kind_time_idx ON events (kind, time DESC);

-- id is in the order too: TimescaleDB wants the primary key's columns among the segmentby
-- or orderby columns (it warns otherwise), whose per-batch min/max lets the unique check
-- of an insert into a compressed chunk (a late redelivery) skip the batches it cannot hit.
ALTER TABLE events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'gateway_id, device_id',
    timescaledb.compress_orderby = 'time DESC, id'
);
SELECT add_compression_policy('events', INTERVAL '7 days');
