-- The address update trigger's join of its transition tables is planned for each statement. As static SQL,
-- PL/pgSQL planned it once per connection, when that connection's first update ran, usually over a handful of rows:
-- a nested loop, kept for every later statement. A heartbeat server's state writer then spent 28 s comparing the
-- 11,250 rows of one batch with each other (126 million row pairs). Dynamic SQL is planned with the transition
-- tables' real sizes: a hash join for a batch, a nested loop for one row. A statement that updated no row (a
-- heartbeat server's conditional writes mostly do not) skips the query and its planning.
CREATE OR REPLACE FUNCTION tether_addresses_updated() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF NOT EXISTS (SELECT FROM new_rows) THEN
        RETURN NULL;
    END IF;
    EXECUTE $query$
        SELECT array_agg(DISTINCT d)
          FROM (SELECT n.domain_id, o.domain_id
                  FROM new_rows n JOIN old_rows o ON o.id = n.id
                 WHERE (n.domain_id, n.ip, n.priority, n.weight, n.load, n.state)
                       IS DISTINCT FROM (o.domain_id, o.ip, o.priority, o.weight, o.load, o.state)) AS c (a, b),
               LATERAL (VALUES (c.a), (c.b)) AS v (d)
    $query$ INTO ids;
    IF ids IS NOT NULL THEN
        PERFORM tether_domains_changed(ids);
    END IF;
    RETURN NULL;
END $$;
