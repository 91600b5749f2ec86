#!/bin/bash
# Written by `f2pipe deploy render`; changes are overwritten.
# `setup.sh apply BOOTSTRAP`: the SCRAM-SHA-512 users of the operator and of each
# service, exactly the services' ACLs (f2pipe.operations.principals) and the topics,
# as `f2pipe stack up` makes them. `setup.sh probe BOOTSTRAP`: the broker answers.
# Connects as the broker's own super user (PLAIN); idempotent. Passwords come from
# the environment: BROKER_KAFKA_PASSWORD, ADMIN_KAFKA_PASSWORD and <SERVICE>_KAFKA_PASSWORD.
set -euo pipefail
mode=${1:?usage: setup.sh apply|probe BOOTSTRAP}
bootstrap=${2:?usage: setup.sh apply|probe BOOTSTRAP}
bin=${KAFKA_TOOLS:-/opt/kafka/bin}
umask 077
config=$(mktemp)
cat > "$config" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="f2pipe-broker" password="${BROKER_KAFKA_PASSWORD}";
EOF
if [ "$mode" = probe ]; then
    exec "$bin/kafka-broker-api-versions.sh" --bootstrap-server "$bootstrap" \
        --command-config "$config" >/dev/null
fi
user() {
    "$bin/kafka-configs.sh" --bootstrap-server "$bootstrap" --command-config "$config" \
        --alter --entity-type users --entity-name "$1" \
        --add-config "SCRAM-SHA-512=[iterations=8192,password=$2]" >/dev/null
}
acl() {
    "$bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$config" \
        "$@" >/dev/null
}
topic() {
    "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --command-config "$config" \
        --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 \
        --config cleanup.policy=delete --config retention.ms="$3"
}

# Users: the operator (a super user) and every service.
user f2pipe-admin "${ADMIN_KAFKA_PASSWORD}"
user f2pipe-connector "${CONNECTOR_KAFKA_PASSWORD}"
user f2pipe-processor "${PROCESSOR_KAFKA_PASSWORD}"
user f2pipe-sink "${SINK_KAFKA_PASSWORD}"

# ACLs: nothing else is allowed (allow.everyone.if.no.acl.found=false).
acl --add --allow-principal User:f2pipe-connector --operation Write --topic raw-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-connector --operation Describe --topic raw-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-connector --operation Write --topic iot-dead-letter --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-connector --operation Describe --topic iot-dead-letter --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Read --topic raw-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Describe --topic raw-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Read --group f2pipe-processor --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Describe --group f2pipe-processor --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Write --topic processed-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Describe --topic processed-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Write --topic iot-dead-letter --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Describe --topic iot-dead-letter --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-processor --operation Write --transactional-id f2pipe-processor --resource-pattern-type prefixed
acl --add --allow-principal User:f2pipe-processor --operation Describe --transactional-id f2pipe-processor --resource-pattern-type prefixed
acl --add --allow-principal User:f2pipe-sink --operation Read --topic processed-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-sink --operation Describe --topic processed-iot-data --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-sink --operation Read --group f2pipe-sink --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-sink --operation Describe --group f2pipe-sink --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-sink --operation Write --topic iot-dead-letter --resource-pattern-type literal
acl --add --allow-principal User:f2pipe-sink --operation Describe --topic iot-dead-letter --resource-pattern-type literal

# Topics: explicit partitions, the delete policy (the sink needs every record),
# 7 days for the data topics, 30 for dead letters (SPEC section 4).
topic raw-iot-data 6 604800000
topic processed-iot-data 6 604800000
topic iot-dead-letter 3 2592000000
