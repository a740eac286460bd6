-- Service tuples configure sites: the NCU (or server agent) holding a tuple's address checks the service behind it
-- and reports; a tuple whose service fails is left out of the SRV answers while its address stays live.
ALTER TABLE services
    ADD COLUMN healthy boolean NOT NULL DEFAULT true,
    ADD COLUMN health_reason text CHECK (length(health_reason) <= 512),
    ADD COLUMN health_at timestamptz;
