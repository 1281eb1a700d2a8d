"""The shared contract between aggregator and agents. Imports neither side."""
