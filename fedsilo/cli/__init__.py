"""The `fedsilo` command: one entry point for the demo, the local federation, the services and the operator's tasks.

Each module registers its commands on `main`: `services` (demo, aggregator, agent), `localfed` (local, broker),
`jobs` (job, sites, report), `site` (data, model, policy, audit) and `pki` (certs, operator).
"""

from __future__ import annotations

from fedsilo.cli import jobs, localfed, pki, services, site
from fedsilo.cli._root import main

__all__ = ["jobs", "localfed", "main", "pki", "services", "site"]
