-- Registry: who and where. Ids are text chosen by the municipality (stable across imports).
CREATE TABLE districts (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    timezone    text NOT NULL DEFAULT 'Europe/Oslo',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A site is a private home or a care home.
CREATE TABLE sites (
    id           text PRIMARY KEY,
    district_id  text NOT NULL REFERENCES districts (id),
    kind         text NOT NULL CHECK (kind IN ('home', 'care_home')),
    name         text NOT NULL,
    address      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sites_district_idx ON sites (district_id);

CREATE TABLE residents (
    id            text PRIMARY KEY,
    site_id       text NOT NULL REFERENCES sites (id),
    display_name  text NOT NULL,
    room          text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX residents_site_idx ON residents (site_id);

CREATE TABLE gateways (
    id                 text PRIMARY KEY,
    site_id            text NOT NULL REFERENCES sites (id),
    status             text NOT NULL DEFAULT 'unknown'
                       CHECK (status IN ('unknown', 'online', 'offline')),
    status_time        timestamptz,   -- the gateway's own time on its last status message
    status_changed_at  timestamptz,   -- hub time of the last change of status
    version            text,
    queue_depth        integer,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gateways_site_idx ON gateways (site_id);

-- Device ids are unique per gateway (a Zigbee friendly name such as "front_door"
-- repeats across homes).
CREATE TABLE devices (
    gateway_id   text NOT NULL REFERENCES gateways (id),
    id           text NOT NULL,
    device_type  text NOT NULL,
    resident_id  text REFERENCES residents (id),
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, id)
);
CREATE INDEX devices_resident_idx ON devices (resident_id);
