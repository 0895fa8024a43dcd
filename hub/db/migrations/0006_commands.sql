-- Commands from the hub to devices behind a gateway (unlock, lock, dispenser schedule,
-- clock sync, test alarm), who asked for each and what came of it. Until the audit log
-- arrives (alarm service issue), this table is the record of every unlock.
CREATE TABLE commands (
    id            uuid PRIMARY KEY,
    gateway_id    text NOT NULL REFERENCES gateways (id),
    device_id     text NOT NULL,
    kind          text NOT NULL
                  CHECK (kind IN ('unlock', 'lock', 'dispenser_schedule', 'sync_clock',
                                  'test_alarm')),
    params        jsonb NOT NULL DEFAULT '{}',
    actor         text NOT NULL,
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'sent', 'succeeded', 'failed')),
    sent_at       timestamptz,
    result_at     timestamptz,   -- hub time the result arrived
    result_time   timestamptz,   -- the gateway's time on the result
    error         text
);
CREATE INDEX commands_device_idx ON commands (gateway_id, device_id, created_at DESC);
CREATE INDEX commands_created_idx ON commands (created_at DESC);
