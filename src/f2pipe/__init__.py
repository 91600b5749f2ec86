"""f2pipe: telemetry from F2 Smart Controllers, over mTLS MQTT and Kafka, into TimescaleDB."""

__version__ = "0.1.0"

__all__ = ["__version__"]
