-- tether's schema: subscribers, zones, domains, addresses, services, ncus, enrollments, heartbeat servers.
--
-- Every change that alters DNS answers bumps the zone serial and sends
-- NOTIFY tether_changes in the same transaction. Triggers do it, so every writer (the admin API, heartbeat servers,
-- an operator with psql) gets it for free. Payloads: 'domain:<id>' for a domain and what hangs off it,
-- 'zone:<id>' for the zone itself.

CREATE TABLE subscribers (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE zones (
    id           bigserial PRIMARY KEY,
    origin       text NOT NULL UNIQUE,           -- lower case, fully qualified, trailing dot
    -- [{"name": "ns1.example.net.", "ips": ["198.18.0.53"]}]; ips are glue, served when the name is in the zone.
    nameservers  jsonb NOT NULL,
    hostmaster   text NOT NULL,                  -- SOA RNAME, as a domain name
    serial       bigint NOT NULL DEFAULT 1,
    refresh      integer NOT NULL DEFAULT 3600 CHECK (refresh > 0),
    retry        integer NOT NULL DEFAULT 600 CHECK (retry > 0),
    expire       integer NOT NULL DEFAULT 604800 CHECK (expire > 0),
    minimum      integer NOT NULL DEFAULT 1 CHECK (minimum >= 0),
    soa_ttl      integer NOT NULL DEFAULT 60 CHECK (soa_ttl >= 0),
    ns_ttl       integer NOT NULL DEFAULT 3600 CHECK (ns_ttl >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE domains (
    id                  bigserial PRIMARY KEY,
    fqdn                text NOT NULL UNIQUE,    -- lower case, fully qualified, trailing dot
    zone_id             bigint NOT NULL REFERENCES zones (id) ON DELETE RESTRICT,
    subscriber_id       bigint NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
    static_ip           inet,                    -- owned by the packet-forwarder
    ttl                 integer NOT NULL DEFAULT 1 CHECK (ttl >= 0),
    fallback_ip         inet,                    -- the "apology page" when nothing is live
    when_empty          text NOT NULL DEFAULT 'nodata' CHECK (when_empty IN ('nodata', 'last_known')),
    load_threshold_pct  integer NOT NULL DEFAULT 50 CHECK (load_threshold_pct > 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_zone_id ON domains (zone_id);
CREATE INDEX domains_subscriber_id ON domains (subscriber_id);

CREATE TYPE address_state AS ENUM ('pending', 'live', 'dead');
CREATE TYPE address_source AS ENUM ('ncu', 'static');

CREATE TABLE ncus (
    id                 bigserial PRIMARY KEY,
    domain_id          bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    cert_fingerprint   bytea NOT NULL UNIQUE,    -- SHA-256 of the client certificate (DER)
    serial_number      text,
    mac                text,
    enrolled_at        timestamptz NOT NULL DEFAULT now(),
    last_seen          timestamptz
);
CREATE INDEX ncus_domain_id ON ncus (domain_id);

CREATE TABLE addresses (
    id            bigserial PRIMARY KEY,
    domain_id     bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    ip            inet NOT NULL,                 -- the published address (observed source behind NAT)
    interface_ip  inet,                          -- the address the NCU reported, when it differs
    source        address_source NOT NULL,
    ncu_id        bigint REFERENCES ncus (id) ON DELETE CASCADE,
    uplink        text,
    priority      integer NOT NULL DEFAULT 0 CHECK (priority >= 0),  -- lower is preferred
    weight        integer NOT NULL DEFAULT 1 CHECK (weight > 0 AND weight <= 65535),
    load          real NOT NULL DEFAULT 0 CHECK (load >= 0),
    state         address_state NOT NULL DEFAULT 'pending',
    hbs           text,                          -- heartbeat server in charge
    "check"       jsonb,                         -- service check for static addresses
    changed_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, ip)
);
CREATE INDEX addresses_hbs ON addresses (hbs) WHERE hbs IS NOT NULL;

CREATE TABLE services (
    id         bigserial PRIMARY KEY,
    domain_id  bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    service    text NOT NULL,                    -- "http", without the underscore
    transport  text NOT NULL CHECK (transport IN ('tcp', 'udp', 'sctp', 'tls')),
    ip         inet,                             -- published under a generated target name
    target     text,                             -- or an explicit target name
    port       integer NOT NULL CHECK (port BETWEEN 0 AND 65535),
    priority   integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 65535),
    weight     integer NOT NULL DEFAULT 0 CHECK (weight BETWEEN 0 AND 65535),
    CHECK (ip IS NOT NULL OR target IS NOT NULL)
);
CREATE INDEX services_domain_id ON services (domain_id);

CREATE TABLE enrollments (
    id          bigserial PRIMARY KEY,
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TYPE hbs_state AS ENUM ('active', 'full', 'draining');

CREATE TABLE heartbeat_servers (
    name             text PRIMARY KEY,
    control_address  text NOT NULL,
    capacity         integer NOT NULL CHECK (capacity > 0),
    current_load     integer NOT NULL DEFAULT 0 CHECK (current_load >= 0),
    state            hbs_state NOT NULL DEFAULT 'active',
    last_seen        timestamptz NOT NULL DEFAULT now()
);

-- Change propagation ------------------------------------------------------------------------------------------

-- Bumps the serial of each zone holding one of the given domains and notifies each domain.
CREATE FUNCTION tether_domains_changed(domain_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d bigint;
BEGIN
    UPDATE zones SET serial = serial + 1
     WHERE id IN (SELECT DISTINCT zone_id FROM domains WHERE id = ANY (domain_ids));
    FOREACH d IN ARRAY domain_ids LOOP
        PERFORM pg_notify('tether_changes', 'domain:' || d);
    END LOOP;
END $$;

-- Statement-level triggers over transition tables: one serial bump per zone and statement, however many rows.
CREATE FUNCTION tether_child_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT domain_id) INTO ids FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT domain_id) INTO ids FROM old_rows;
    ELSE
        SELECT array_agg(DISTINCT domain_id) INTO ids
          FROM (SELECT domain_id FROM new_rows UNION SELECT domain_id FROM old_rows) AS changed;
    END IF;
    IF ids IS NOT NULL THEN
        PERFORM tether_domains_changed(ids);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER addresses_insert AFTER INSERT ON addresses
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER addresses_update AFTER UPDATE ON addresses
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER addresses_delete AFTER DELETE ON addresses
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER services_insert AFTER INSERT ON services
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER services_update AFTER UPDATE ON services
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER services_delete AFTER DELETE ON services
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();

-- A domain row itself: its own id is the payload; a deleted domain still bumps its zone's serial.
CREATE FUNCTION tether_domain_row_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    UPDATE zones SET serial = serial + 1 WHERE id = r.zone_id;
    IF TG_OP = 'UPDATE' AND OLD.zone_id <> NEW.zone_id THEN
        UPDATE zones SET serial = serial + 1 WHERE id = OLD.zone_id;
    END IF;
    PERFORM pg_notify('tether_changes', 'domain:' || r.id);
    RETURN NULL;
END $$;

CREATE TRIGGER domains_changed AFTER INSERT OR UPDATE OR DELETE ON domains
    FOR EACH ROW EXECUTE FUNCTION tether_domain_row_changed();

-- A zone row: the serial is bumped by the writer (or by the functions above); listeners reload the zone.
CREATE FUNCTION tether_zone_row_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tether_changes', 'zone:' || OLD.id);
    ELSE
        PERFORM pg_notify('tether_changes', 'zone:' || NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER zones_changed AFTER INSERT OR UPDATE OR DELETE ON zones
    FOR EACH ROW EXECUTE FUNCTION tether_zone_row_changed();
