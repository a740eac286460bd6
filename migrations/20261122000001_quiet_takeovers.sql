-- An address update notifies (and bumps the zone serial) only when something readers answer from changed: its
-- domain, ip, priority, weight, load or state. A heartbeat server taking rows over (hbs), a static check changing
-- hands, or the NCU's interface address behind NAT changes no answer; in a failover storm, the takeovers of ten
-- thousand NCUs would otherwise send ten thousand notifications, each making every dns and packet-forwarder
-- reload that domain for nothing.
CREATE FUNCTION tether_addresses_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    SELECT array_agg(DISTINCT d) INTO ids
      FROM (SELECT n.domain_id, o.domain_id
              FROM new_rows n JOIN old_rows o ON o.id = n.id
             WHERE (n.domain_id, n.ip, n.priority, n.weight, n.load, n.state)
                   IS DISTINCT FROM (o.domain_id, o.ip, o.priority, o.weight, o.load, o.state)) AS c (a, b),
           LATERAL (VALUES (c.a), (c.b)) AS v (d);
    IF ids IS NOT NULL THEN
        PERFORM tether_domains_changed(ids);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER addresses_update ON addresses;
CREATE TRIGGER addresses_update AFTER UPDATE ON addresses
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_addresses_updated();
