"""Running f2pipe on a machine.

- :mod:`.stack`: the local servers (PostgreSQL, Redis, Kafka, Mosquitto with
  its configuration and ACL), one module each, and ``f2pipe stack``;
- :mod:`.services`: the f2pipe services as supervised processes;
- :mod:`.status`: ``f2pipe status`` and the live view;
- :mod:`.pipeline`: ``f2pipe up``, ``down`` and ``run``, which use all of the above.
"""
