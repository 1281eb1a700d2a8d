"""The fedsilo CLI and the local launcher (demo, private broker)."""
