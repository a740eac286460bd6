-- Zone transfers: who may transfer a zone (address prefixes, TSIG keys) and whom dns notifies of its changes.
-- {"secondaries": [{"prefix": "198.18.0.0/24", "key": "k1"}], "notify": [{"addr": "198.18.0.2:53", "key": "k1"}],
--  "keys": [{"name": "k1", "algorithm": "hmac-sha256", "secret": "<base64>"}]}
-- Written by the operator API only; an update reloads the zone (zones_changed) without bumping its serial.
ALTER TABLE zones ADD COLUMN transfer jsonb NOT NULL DEFAULT '{}';
