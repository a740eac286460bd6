-- The history of every address: registrations, state transitions, handovers between heartbeat servers, removals.
-- Written by statement-level triggers in the writer's own statement and transaction: no extra round trip per
-- transition (a batch of ten thousand transitions is one INSERT … SELECT), and nothing lost when a writer dies after
-- committing. Pruned in batches by dns (`event_retention`).
--
-- The reason is derived where the row says it all (a static address's state is its check's; an NCU address that
-- goes dead went silent; a handover from a draining server is a drain), and otherwise named by the writer for its
-- transaction with set_config('tether.reason', …, true): withdrawn, address changed, rehome timeout, deleted.
CREATE TABLE address_events (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    domain_id     bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    address_id    bigint NOT NULL,                 -- the addresses row, which may be gone
    ip            inet NOT NULL,
    interface_ip  inet,
    source        address_source NOT NULL,
    uplink        text,
    ncu_id        bigint,
    kind          text NOT NULL CHECK (kind IN ('registered', 'state', 'handover', 'removed')),
    state         address_state,                   -- after the event
    previous      address_state,                   -- before it
    hbs           text,                            -- the heartbeat server in charge after it
    previous_hbs  text,
    reason        text NOT NULL
);
CREATE INDEX address_events_domain_at ON address_events (domain_id, at);
CREATE INDEX address_events_at ON address_events (at);

CREATE FUNCTION tether_reason(fallback text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(NULLIF(current_setting('tether.reason', true), ''), fallback)
$$;

CREATE FUNCTION tether_address_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO address_events (domain_id, address_id, ip, interface_ip, source, uplink, ncu_id, kind, state,
                                    hbs, reason)
        SELECT n.domain_id, n.id, n.ip, n.interface_ip, n.source, n.uplink, n.ncu_id, 'registered', n.state, n.hbs,
               tether_reason(CASE n.source WHEN 'ncu' THEN 'registered by the NCU' ELSE 'added' END)
          FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO address_events (domain_id, address_id, ip, interface_ip, source, uplink, ncu_id, kind,
                                    previous, previous_hbs, reason)
        SELECT o.domain_id, o.id, o.ip, o.interface_ip, o.source, o.uplink, o.ncu_id, 'removed', o.state, o.hbs,
               tether_reason('removed')
          FROM old_rows o
         WHERE EXISTS (SELECT 1 FROM domains d WHERE d.id = o.domain_id);  -- not when the domain itself goes
    ELSE
        INSERT INTO address_events (domain_id, address_id, ip, interface_ip, source, uplink, ncu_id, kind, state,
                                    previous, hbs, previous_hbs, reason)
        SELECT n.domain_id, n.id, n.ip, n.interface_ip, n.source, n.uplink, n.ncu_id,
               CASE WHEN n.state IS DISTINCT FROM o.state THEN 'state' ELSE 'handover' END,
               n.state, o.state, n.hbs, o.hbs,
               CASE
                   WHEN n.state IS DISTINCT FROM o.state THEN tether_reason(
                       CASE
                           WHEN n.source = 'static' AND n."check" IS NOT NULL AND n.state = 'live' THEN 'check passed'
                           WHEN n.source = 'static' AND n."check" IS NOT NULL AND n.state = 'dead' THEN 'check failed'
                           WHEN n.state = 'live' AND o.state = 'pending' THEN 'answered: address proven'
                           WHEN n.state = 'live' THEN 'answering again'
                           WHEN n.state = 'dead' AND n.source = 'ncu' THEN 'silent: pings unanswered'
                           WHEN n.state = 'dead' THEN 'dead'
                           ELSE 'registered again'
                       END)
                   WHEN EXISTS (SELECT 1 FROM heartbeat_servers h WHERE h.name = o.hbs AND h.state = 'draining')
                       THEN 'drained: moved off a draining server'
                   WHEN o.hbs IS NULL THEN tether_reason('taken on')
                   ELSE tether_reason('failover: moved to the backup')
               END
          FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.state IS DISTINCT FROM o.state
            OR (n.hbs IS DISTINCT FROM o.hbs AND n.hbs IS NOT NULL);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER address_events_insert AFTER INSERT ON addresses
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_address_events();
CREATE TRIGGER address_events_update AFTER UPDATE ON addresses
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_address_events();
CREATE TRIGGER address_events_delete AFTER DELETE ON addresses
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_address_events();
