-- Enrollment survives a lost reply: the token remembers the CSR it was used with and the certificate it gave, so the
-- same CSR within the token's lifetime gets the same certificate again (any other request still gets "used").
ALTER TABLE enrollments
    ADD COLUMN csr_hash bytea,
    ADD COLUMN certificate text,
    ADD COLUMN ncu_id bigint REFERENCES ncus (id) ON DELETE SET NULL;

-- Renewal: the next certificate is valid beside the current one until it is first used (then it replaces it), so a
-- renewal whose reply was lost leaves the NCU with a working certificate, and the same CSR gets the same answer.
ALTER TABLE ncus
    ADD COLUMN next_fingerprint bytea UNIQUE,
    ADD COLUMN next_certificate text,
    ADD COLUMN next_csr_hash bytea,
    ADD COLUMN renewed_at timestamptz;
