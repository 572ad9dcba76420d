"""Auditing the event log: past states, replays, exports, checkpoints, checks.

- ``history``: what an order or item looked like as of a past position or
  time, folded from the log by the live projection's own code.
- ``chains``: recomputing a stream's hash chain and naming what disagrees.
- ``digest``: the signed digest of every stream head (exact encoding).
- ``settle``: the highest position below which the log can no longer change.
- ``checkpoints``: recording and listing signed checkpoints.
- ``verify``: checking the table's chains and every checkpoint.
- ``export`` and ``verify_export``: NDJSON exports and their offline check.
"""
