"""
kvtwist-check: a conformance and concurrency checker for any server that
speaks the kvtwist protocol (the kvtwist server itself, or anyone's own).

It runs real clients against a running server (or several nodes that
claim to share one store), records what happened, and
reports PASS or FAIL per check with the exact requests and replies behind
every failure. See docs/checker.md; the command is ``kvtwist-check`` (or
``python -m kvtwist.check``), implemented in ``cli``.

Modules, one job each:

- ``cli``: the command line, on ``twisted.internet.task.react``;
- ``runner``: which checks run, in which order;
- ``nodes``: the servers under test as the command line names them;
- ``target``: the servers under test, the run's settings and clock;
- ``conformance`` and ``script``: scripted single-client conversations;
- ``serving``: replies while another client is idle or half-way;
- ``robustness``: replies while another client misbehaves;
- ``visibility`` and ``concurrency``: many clients at once, recorded
  into a ``history`` and judged by ``linearizability`` against ``model``;
- ``workload``: everything random, derived from the seed;
- ``probe``: raw connections that record exact bytes;
- ``report``: results as text and JSON.
"""
