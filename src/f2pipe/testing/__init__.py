"""Support for the test suite and the benchmarks, shipped with the package.

:mod:`.servers` starts private servers (Mosquitto, a single-node Kafka, the
connector) on free loopback ports with their own data folders, makes a
throwaway PKI, and reads topics back. Nothing here is used by the pipeline
itself; it exists so that ``tests/`` and ``bench/`` exercise the real servers
the same way, and so that a benchmark needs only the installed package.
"""
