-- Hub-side supervision of gateways: when each was last heard from (any message), and an
-- optional per-gateway timeout (NULL = TELECARE_SUPERVISION__GATEWAY_TIMEOUT_S).
ALTER TABLE gateways ADD COLUMN last_seen_at timestamptz;
ALTER TABLE gateways ADD COLUMN supervision_timeout_s integer
    CHECK (supervision_timeout_s IS NULL OR supervision_timeout_s > 0);
