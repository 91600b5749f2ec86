"""The Kafka -> database sink stage (``f2pipe sink``): see :mod:`.runner`."""
