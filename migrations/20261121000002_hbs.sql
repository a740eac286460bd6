-- Heartbeat servers: an NCU's address is identified by (ncu, uplink), not by its IP, which changes behind NAT
-- (the published ip is the observed source) and with every new lease.
CREATE UNIQUE INDEX addresses_ncu_uplink ON addresses (ncu_id, uplink) WHERE source = 'ncu';
CREATE INDEX addresses_static_checks ON addresses (hbs) WHERE source = 'static' AND "check" IS NOT NULL;
