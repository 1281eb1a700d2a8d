"""`make bench`: every benchmark in turn."""

from bench import accuracy

accuracy.main()
