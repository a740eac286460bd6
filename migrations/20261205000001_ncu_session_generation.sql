-- The newest session owns an NCU's addresses. Each control session carries a generation the NCU raises with every
-- new session; a registration is written only while its generation is at least the stored one, so a registration
-- that commits after its connection closed (the NCU has moved on) never takes the rows back from the newer session.
ALTER TABLE ncus ADD COLUMN session_generation bigint NOT NULL DEFAULT 0;
