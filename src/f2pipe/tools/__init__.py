"""Commands for people: ``decode``, ``dlq``, ``cmnd``, ``bench`` and the device
simulator (``simulate``)."""
