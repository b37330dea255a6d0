"""
The benchmark harness: ``python -m kvtwist.bench``.

It builds the C load generator (``kvbench.c``, shipped in this package),
starts kvtwist and, when installed, redis-server on free loopback ports, runs
the same workload against each in interleaved rounds, and reports
throughput, server CPU per request, latency and memory, with every ratio
against Redis taken as the median of per-round ratios from the same run.
"""
