-- TSIG keys for RFC 2136 UPDATE (nsupdate, certbot's DNS plugins, external-dns): each belongs to one domain and may
-- change only that domain's A/AAAA and the TXT records at it or under it. The secret is kept as given: a TSIG MAC
-- needs it.
CREATE TABLE update_keys (
    id          bigserial PRIMARY KEY,
    domain_id   bigint NOT NULL REFERENCES domains (id) ON DELETE CASCADE,
    name        text NOT NULL UNIQUE,                -- lower case, fully qualified key name
    algorithm   text NOT NULL CHECK (algorithm IN ('hmac-sha256', 'hmac-sha384', 'hmac-sha512')),
    secret      text NOT NULL,                       -- base64
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX update_keys_domain ON update_keys (domain_id);
