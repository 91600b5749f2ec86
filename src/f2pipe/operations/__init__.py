"""Running f2pipe on a machine: the local servers (:mod:`.stack`, the broker's
configuration in :mod:`.broker`), the services and ``up``/``down``/``run``
(:mod:`.services`), and ``status`` with the live view (:mod:`.status`)."""
