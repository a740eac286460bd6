-- TXT records a domain's owner publishes at the domain or under it (ACME DNS-01 challenges, SPF, site verification).
CREATE TABLE txt_records (
    id         bigserial PRIMARY KEY,
    domain_id  bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    owner      text NOT NULL,                       -- lower case, fully qualified: the domain or a name under it
    value      text NOT NULL CHECK (length(value) BETWEEN 1 AND 1024),
    ttl        integer NOT NULL DEFAULT 60 CHECK (ttl >= 0),
    UNIQUE (domain_id, owner, value)
);

CREATE TRIGGER txt_records_insert AFTER INSERT ON txt_records
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER txt_records_update AFTER UPDATE ON txt_records
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
CREATE TRIGGER txt_records_delete AFTER DELETE ON txt_records
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION tether_child_changed();
