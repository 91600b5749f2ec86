"""The stream processor stage (``f2pipe processor``): raw frames in, readings out.

- :mod:`.stage`: the pure step, one raw record -> readings, a dead-letter
  verdict or skipped; no I/O but an injected metadata lookup.
- :mod:`.alarm`: the dead-letter ratio alarm (pure).
- :mod:`.metrics`: every metric the processor reports.
- :mod:`.delivery`: outputs into Kafka, then the input offsets committed
  (optionally in one transaction).
- :mod:`.runner`: :class:`~.runner.Processor`, the loop that owns the I/O
  (Kafka, metadata, signals), and the CLI entry.
"""
