#!/bin/sh
# Written by f2pipe (f2pipe.operations.stack.mosquitto); changes are overwritten.
# Usage: broker.sh MOSQUITTO_CONF. Starts Mosquitto with that configuration and
# sends it SIGHUP within 2 s of its CRL file (the conf's crlfile) changing:
# Mosquitto re-reads the CRL only then, and certgen, which rewrites the file when
# it revokes a certificate, need not be able to signal this process.
set -u
conf=${1:?usage: broker.sh MOSQUITTO_CONF}
crl=$(sed -n 's/^crlfile //p' "$conf")
${MOSQUITTO:-mosquitto} -c "$conf" &
broker=$!
trap 'kill -TERM "$broker" 2>/dev/null; wait "$broker"; exit $?' TERM INT
seen=$(cksum < "$crl" 2>/dev/null)
while kill -0 "$broker" 2>/dev/null; do
    sleep 2 &
    wait $!
    now=$(cksum < "$crl" 2>/dev/null)
    if [ "$now" != "$seen" ]; then
        seen=$now
        kill -HUP "$broker"
    fi
done
wait "$broker"
