-- Host migration: a domain's answers move from one address to another while flows that still reach the old address
-- are redirected to the new one by a relay where the old address lives (a packet-forwarder on that host).
--
-- Phases: announced (answers moved; waiting for a relay to hold the old address) → redirecting (the relay sends new
-- flows to the old address on to the new one) → done (hold and quiet time passed; the relay lets go). The old
-- address stays out of the answers as long as the migration row exists, whatever its phase; deleting an unfinished
-- migration rolls it back.
CREATE TYPE migration_phase AS ENUM ('announced', 'redirecting', 'done');

CREATE TABLE host_migrations (
    id             bigserial PRIMARY KEY,
    domain_id      bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    from_ip        inet NOT NULL,
    to_ip          inet NOT NULL CHECK (to_ip <> from_ip),
    temporary_ip   inet CHECK (temporary_ip <> from_ip),     -- answered instead of to_ip while announced
    ports          integer[] NOT NULL
        CHECK (cardinality(ports) BETWEEN 1 AND 64 AND array_position(ports, NULL) IS NULL
               AND 1 <= ALL (ports) AND 65535 >= ALL (ports)),
    phase          migration_phase NOT NULL DEFAULT 'announced',
    hold_s         integer NOT NULL CHECK (hold_s BETWEEN 0 AND 604800),
    quiet_s        integer NOT NULL CHECK (quiet_s BETWEEN 0 AND 604800),
    created_at     timestamptz NOT NULL DEFAULT now(),
    redirect_at    timestamptz,                              -- entered redirecting
    done_at        timestamptz,
    relay          text,                                     -- the relay holding from_ip, as it names itself
    relay_at       timestamptz,                              -- when it started redirecting
    relay_error    text,                                     -- why a relay that holds from_ip cannot redirect
    flows          bigint NOT NULL DEFAULT 0 CHECK (flows >= 0),  -- new flows redirected so far
    last_flow_at   timestamptz
);
CREATE INDEX host_migrations_domain_id ON host_migrations (domain_id);
-- One unfinished migration per domain.
CREATE UNIQUE INDEX host_migrations_one_active ON host_migrations (domain_id) WHERE phase <> 'done';

-- What the answers depend on (the row, its phase) notifies the domain; the relay's counters do not.
CREATE TRIGGER host_migrations_insert AFTER INSERT ON host_migrations
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER host_migrations_delete AFTER DELETE ON host_migrations
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE FUNCTION tether_migration_phase_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tether_domains_changed(ARRAY[NEW.domain_id]);
    RETURN NULL;
END $$;
CREATE TRIGGER host_migrations_phase AFTER UPDATE OF phase ON host_migrations
    FOR EACH ROW WHEN (OLD.phase IS DISTINCT FROM NEW.phase) EXECUTE FUNCTION tether_migration_phase_changed();

-- The longest TTL the name has been served with: a migration's default hold is a multiple of it.
ALTER TABLE domains ADD COLUMN max_ttl_served integer NOT NULL DEFAULT 0;
UPDATE domains SET max_ttl_served = ttl;
CREATE FUNCTION tether_domain_max_ttl() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        NEW.max_ttl_served := GREATEST(OLD.max_ttl_served, NEW.max_ttl_served, NEW.ttl);
    ELSE
        NEW.max_ttl_served := GREATEST(NEW.max_ttl_served, NEW.ttl);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER domains_max_ttl BEFORE INSERT OR UPDATE OF ttl ON domains
    FOR EACH ROW EXECUTE FUNCTION tether_domain_max_ttl();
