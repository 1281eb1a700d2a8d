"""`python -m bench [NAME [options]]`: one benchmark by name, or (no name, as `make bench` runs it) the accuracy,
latency and privacy–utility benchmarks in turn. `scale` runs only by name: its default matrix takes long; so does
`blobs`, which needs the test extras (moto)."""

import sys
from collections.abc import Callable

from bench import accuracy, blobs, latency, privacy_utility, scale

ONE: dict[str, Callable[[list[str]], None]] = {
    "accuracy": accuracy.main,
    "blobs": blobs.main,
    "latency": latency.main,
    "privacy-utility": privacy_utility.main,
    "scale": scale.main,
}

if len(sys.argv) > 1:
    if sys.argv[1] not in ONE:
        sys.exit(f"unknown benchmark {sys.argv[1]!r}; choose one of: {', '.join(ONE)}")
    ONE[sys.argv[1]](sys.argv[2:])
else:
    accuracy.main([])
    latency.main([])
    privacy_utility.main([])
