#!/bin/bash
# Written by `f2pipe deploy render`; changes are overwritten.
# The pipeline's topics, as `f2pipe stack up` creates them (SPEC section 4): explicit
# partitions, the delete cleanup policy (the sink needs every record), 7 days for the
# data topics and 30 for dead letters. Existing topics are left as they are.
set -euo pipefail
bootstrap=${1:?usage: topics.sh BOOTSTRAP}
create() {
    /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$bootstrap" --create \
        --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 \
        --config cleanup.policy=delete --config retention.ms="$3"
}
create raw-iot-data 6 604800000
create processed-iot-data 6 604800000
create iot-dead-letter 3 2592000000
