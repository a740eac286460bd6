-- A static address is one domain's: no tenant can claim ports on another's. Where two domains shared one, the
-- forwarder already served only the older; the newer ones lose the address here (their rows are kept).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT d.id, d.fqdn, d.static_ip FROM domains d
              WHERE d.static_ip IS NOT NULL
                AND EXISTS (SELECT 1 FROM domains o WHERE o.static_ip = d.static_ip AND o.id < d.id) LOOP
        RAISE NOTICE 'domain % loses static address % (an older domain holds it)', r.fqdn, r.static_ip;
        UPDATE domains SET static_ip = NULL WHERE id = r.id;
    END LOOP;
END $$;
DROP INDEX IF EXISTS domains_static_ip;
CREATE UNIQUE INDEX domains_static_ip ON domains (static_ip) WHERE static_ip IS NOT NULL;
