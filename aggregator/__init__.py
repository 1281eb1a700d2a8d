"""The aggregator service: API, round engine, aggregation, persistence, metrics."""
