"""The Kafka -> database sink stage (``f2pipe sink``): processed readings into ``decoded_data``.

- :mod:`.stage`: pure; a record value -> a row or the detail of its rejection,
  and the binary COPY encoding.
- :mod:`.batching`: when a batch is written (:class:`~.batching.CommitPolicy`),
  the open batch, the retry schedule.
- :mod:`.writer`: the database side; idempotent COPY, ``latest_readings``.
- :mod:`.settle`: after the database commit; dead letters, then offsets.
- :mod:`.metrics`: the sink's metrics.
- :mod:`.runner`: the consumer loop and the ``f2pipe sink`` command.
"""
