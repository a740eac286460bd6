-- The change feed as rows too. NOTIFY reaches only listeners of the primary; a dns whose view reads a hot standby
-- (a second master site, issue 21) cannot LISTEN there, so it follows this log, which streams to the standby with
-- everything else. Rows are kept for a while (dns on the primary prunes them) and applied idempotently: a reader
-- that falls behind the pruning reloads everything.
CREATE TABLE change_log (
    id       bigserial PRIMARY KEY,
    payload  text NOT NULL,
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX change_log_at ON change_log (at);

-- One change: notified to listeners and logged, in the writer's transaction.
CREATE FUNCTION tether_changed(payload text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tether_changes', payload);
    INSERT INTO change_log (payload) VALUES (payload);
END $$;

CREATE OR REPLACE FUNCTION tether_domains_changed(domain_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d bigint;
BEGIN
    FOREACH d IN ARRAY domain_ids LOOP
        PERFORM tether_changed('domain:' || d);
    END LOOP;
    UPDATE zones SET serial = serial + 1
     WHERE id IN (SELECT DISTINCT zone_id FROM domains WHERE id = ANY (domain_ids));
END $$;

CREATE OR REPLACE FUNCTION tether_domain_row_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN
        r := OLD;
    ELSE
        r := NEW;
    END IF;
    PERFORM tether_changed('domain:' || r.id);
    UPDATE zones SET serial = serial + 1 WHERE id = r.zone_id;
    IF TG_OP = 'UPDATE' AND OLD.zone_id <> NEW.zone_id THEN
        UPDATE zones SET serial = serial + 1 WHERE id = OLD.zone_id;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION tether_zone_row_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM tether_changed('zone:' || OLD.id);
    ELSE
        PERFORM tether_changed('zone:' || NEW.id || ':' || NEW.serial);
    END IF;
    RETURN NULL;
END $$;
