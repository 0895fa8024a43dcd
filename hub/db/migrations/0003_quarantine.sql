-- Messages that failed validation: kept with the reason, never silently dropped.
CREATE TABLE quarantine (
    id            bigserial PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    topic         text        NOT NULL,
    gateway_id    text,
    reason        text        NOT NULL,
    detail        text        NOT NULL,
    payload       bytea       NOT NULL,   -- truncated to the configured size
    payload_size  integer     NOT NULL
);
CREATE INDEX quarantine_received_idx ON quarantine (received_at DESC);
