"""What every runner shares: one of each mechanism.

Kafka client configuration and producing with back-pressure (:mod:`.kafka`),
jittered backoff (:mod:`.backoff`), TLS client contexts (:mod:`.tls`), the MQTT
wire helpers (:mod:`.mqttwire`), signal handling and shutdown
(:mod:`.shutdown`), the health/metrics HTTP server (:mod:`.opsserver`),
metrics shared by several stages (:mod:`.metrics`), logging (:mod:`.logs`) and
garbage-collector tuning (:mod:`.gctune`).
"""
