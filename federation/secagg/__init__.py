"""Secure aggregation (Bonawitz et al. 2017 with dropouts, full graph) with distributed discrete Gaussian noise
(Kairouz, Liu & Steinke 2021): the math and the wire messages both sides share. The site's part is `agent.secagg`,
the aggregator's `aggregator.secagg`; docs/secure-aggregation.md has the protocol and its threat model."""
