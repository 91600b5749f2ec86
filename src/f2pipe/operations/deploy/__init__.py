"""Production configuration from the code the local stack runs (SPEC section 10, issue #14).

``f2pipe deploy render --target compose DIR`` writes the compose file, its
``.env.example`` and ``deploy/``: the Mosquitto configuration, ACL and start
script, the Kafka topics, the database roles and grants, the Redis users and
the Prometheus configuration, each from the same functions ``f2pipe stack``
uses or from :mod:`f2pipe.operations.principals`. ``f2pipe deploy shares
PARTY...`` (run where the CA is, as compose's certgen-init does) makes the PKI
and one share folder per party (:func:`f2pipe.pki.state.sync_shares`).

- :mod:`.images`: the server images, pinned to the local stack's versions;
- :mod:`.configs`: the servers' configuration files;
- :mod:`.kafka`: Kafka's nodes (one, or the stack's three-node cluster with
  ``F2PIPE_KAFKA_BROKERS=3``), users, ACLs and topics;
- :mod:`.mqtt`: the brokers' names, ports, shares and ACL folders (one, or
  with ``F2PIPE_MQTT_BROKERS=N`` the local stack's brokers, whose ACLs the
  ``broker-acls`` service writes from the metadata);
- :mod:`.containers`: users, shares, probes and the server containers;
- :mod:`.identities`: each f2pipe container's principal, DSN and Kafka secret;
- :mod:`.connectors`: one connector per broker, and broker-acls;
- :mod:`.compose`: docker-compose.yml with the f2pipe services;
- :mod:`.yamltext`: YAML text with comments, deterministic;
- :mod:`.render`: every file of a target, written to a folder;
- :mod:`.cli`: the ``f2pipe deploy`` command.
"""

from f2pipe.operations.deploy.cli import configure

__all__ = ["configure"]
