"""The MQTT -> Kafka connector stage (``f2pipe connector``): see :mod:`.runner`."""
