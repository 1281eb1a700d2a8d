"""MQTT topic names. Every topic is under one site's subtree so that a per-site ACL is a prefix rule."""

from __future__ import annotations

ROOT = "fedsilo/v1/sites"


def offers(site: str, job_id: str = "+") -> str:
    return f"{ROOT}/{site}/offers/{job_id}"


def tasks(site: str, job_id: str = "+") -> str:
    return f"{ROOT}/{site}/tasks/{job_id}"


def status(site: str = "+") -> str:
    return f"{ROOT}/{site}/status"


def events(site: str = "+") -> str:
    return f"{ROOT}/{site}/events"


def site_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) >= 4 and "/".join(parts[:3]) == ROOT:
        return parts[3]
    return None
