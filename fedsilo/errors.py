"""The one error type the CLI shows as a single line: its message is the whole story (what failed, why, what to
do), so no traceback follows it."""

from __future__ import annotations


class FedsiloError(Exception):
    pass
