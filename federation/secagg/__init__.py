"""The math of secure aggregation: pairwise masks that cancel in the sum (Bonawitz et al. 2017, full graph),
t-of-n recovery of a dropped site's key, and distributed discrete Gaussian noise sized for the sum (Kairouz,
Liu & Steinke 2021).

Plain functions on bytes and numpy vectors, no I/O: the protocol that carries keys, shares and masked vectors
between agents and the aggregator lives elsewhere and calls these.
"""
