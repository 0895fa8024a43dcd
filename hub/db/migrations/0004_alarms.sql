-- Alarms and their timelines.
CREATE TABLE alarms (
    id                uuid PRIMARY KEY,
    site_id           text NOT NULL REFERENCES sites (id),
    resident_id       text REFERENCES residents (id),
    gateway_id        text NOT NULL,
    device_id         text NOT NULL,
    category          text NOT NULL,
    priority          text NOT NULL
                      CHECK (priority IN ('critical', 'high', 'normal', 'technical')),
    state             text NOT NULL
                      CHECK (state IN ('raised', 'acknowledged', 'on_site', 'resolved', 'cancelled')),
    trigger_event_id  uuid NOT NULL,
    trigger_time      timestamptz NOT NULL,  -- device time of the first trigger
    raised_at         timestamptz NOT NULL,  -- hub time the alarm row was written
    updated_at        timestamptz NOT NULL,
    acknowledged_at   timestamptz,
    acknowledged_by   text,
    on_site_at        timestamptz,
    closed_at         timestamptz,
    cause_code        text,
    note              text,
    trigger_count     integer NOT NULL DEFAULT 1
);
-- One open alarm per resident (or per site where the device has no resident) and
-- category: later triggers join it instead of paging again.
CREATE UNIQUE INDEX alarms_one_open_idx
    ON alarms (site_id, coalesce(resident_id, ''), category)
    WHERE state IN ('raised', 'acknowledged', 'on_site');
CREATE INDEX alarms_state_raised_idx ON alarms (state, raised_at DESC);
CREATE INDEX alarms_raised_idx ON alarms (raised_at DESC);

-- Every state change, with who, when and why.
CREATE TABLE alarm_transitions (
    id          bigserial PRIMARY KEY,
    alarm_id    uuid NOT NULL REFERENCES alarms (id),
    at          timestamptz NOT NULL,
    from_state  text,
    to_state    text NOT NULL,
    actor       text NOT NULL,
    reason      text
);
CREATE INDEX alarm_transitions_alarm_idx ON alarm_transitions (alarm_id, at);

-- Every device event that raised or joined an alarm.
CREATE TABLE alarm_triggers (
    alarm_id     uuid NOT NULL REFERENCES alarms (id),
    event_id     uuid NOT NULL,
    event_time   timestamptz NOT NULL,
    kind         text NOT NULL,
    device_id    text NOT NULL,
    received_at  timestamptz NOT NULL,
    PRIMARY KEY (alarm_id, event_id)
);
