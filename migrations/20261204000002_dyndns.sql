-- dyndns2 clients (ddclient, inadyn, routers' DDNS pages): update credentials per domain, and the addresses they set.
ALTER TYPE address_source ADD VALUE IF NOT EXISTS 'dyndns';

CREATE TABLE dyndns_credentials (
    id           bigserial PRIMARY KEY,
    domain_id    bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    username     text NOT NULL UNIQUE,               -- generated, e.g. "dd_3f9a…"
    secret_hash  bytea NOT NULL,                     -- SHA-256 of the generated password
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dyndns_credentials_domain ON dyndns_credentials (domain_id);
