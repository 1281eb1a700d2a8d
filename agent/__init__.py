"""The per-hospital agent: verify, check, train, privatize, send through the egress gate."""
