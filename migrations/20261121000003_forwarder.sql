-- packet-forwarder: per-domain forwarding settings. Updating them fires the domain row trigger
-- (NOTIFY tether_changes, 'domain:<id>'), so forwarders apply them at once.
ALTER TABLE domains
    -- Ports relayed (TCP and UDP) on static_ip; empty: the ports of the domain's service tuples.
    ADD COLUMN forward_ports integer[] NOT NULL DEFAULT '{}'
        CONSTRAINT domains_forward_ports CHECK (
            cardinality(forward_ports) <= 64
            AND array_position(forward_ports, NULL) IS NULL
            AND 1 <= ALL (forward_ports) AND 65535 >= ALL (forward_ports)),
    ADD COLUMN forward_policy text NOT NULL DEFAULT 'round_robin'
        CONSTRAINT domains_forward_policy CHECK (forward_policy IN ('round_robin', 'least_connections')),
    ADD COLUMN proxy_protocol text NOT NULL DEFAULT 'off'
        CONSTRAINT domains_proxy_protocol CHECK (proxy_protocol IN ('off', 'tcp', 'tcp_udp')),
    ADD COLUMN max_flows integer NOT NULL DEFAULT 10000
        CONSTRAINT domains_max_flows CHECK (max_flows > 0),
    ADD COLUMN max_flows_per_client integer NOT NULL DEFAULT 100
        CONSTRAINT domains_max_flows_per_client CHECK (max_flows_per_client > 0 AND max_flows_per_client <= max_flows);

-- The forwarder reads the domains it serves by their static address.
CREATE INDEX domains_static_ip ON domains (static_ip) WHERE static_ip IS NOT NULL;
