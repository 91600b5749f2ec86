#!/bin/sh
# Written by `f2pipe deploy render`; changes are overwritten.
# Redis with one ACL user per service (f2pipe.operations.principals) and the
# operator's; the passwords come from the environment, as SHA-256 in the users file.
set -eu
digest() { printf %s "$1" | sha256sum | cut -c1-64; }
umask 077
acl=$(mktemp)
{
    echo "user default off"
    echo "user f2pipe-admin on #$(digest "$REDIS_PASSWORD") ~* &* +@all"
    echo "user f2pipe-processor on #$(digest "$PROCESSOR_REDIS_PASSWORD") resetchannels ~f2pipe:meta:* +@connection +get +set"
} > "$acl"
# The cache keeps its data across restarts (append-only file), as the local stack does.
exec redis-server --appendonly yes --appendfsync everysec --aclfile "$acl" "$@"
