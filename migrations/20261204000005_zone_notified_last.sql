-- A change's zone notification comes after its domains' notifications, in the same transaction (Postgres delivers
-- a transaction's notifications in the order sent). A reader that applies `zone:<id>` has then already read every
-- domain that transaction changed, so the serial it takes from the zone row never labels a part of the change: zone
-- transfers publish one content per serial (dns/src/view/zone.rs, `continue_journal`).
CREATE OR REPLACE FUNCTION tether_domains_changed(domain_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    d bigint;
BEGIN
    FOREACH d IN ARRAY domain_ids LOOP
        PERFORM pg_notify('tether_changes', 'domain:' || d);
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
    PERFORM pg_notify('tether_changes', 'domain:' || r.id);
    UPDATE zones SET serial = serial + 1 WHERE id = r.zone_id;
    IF TG_OP = 'UPDATE' AND OLD.zone_id <> NEW.zone_id THEN
        UPDATE zones SET serial = serial + 1 WHERE id = OLD.zone_id;
    END IF;
    RETURN NULL;
END $$;
