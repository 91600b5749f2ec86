"""certgen: the f2pipe certificate authority and its HTTP service (SPEC section 6).

- :mod:`f2pipe.pki.ca`: keys, certificates, CSR checks, signing, the ``<state>/pki`` layout.
- :mod:`f2pipe.pki.state`: ``<state>/pki`` made and kept current, the CRL file, and
  the broker facts the CA acts on (its pid file, the connector identities).
- :mod:`f2pipe.pki.api`: the FastAPI app (``create_app``).
- :mod:`f2pipe.pki.auth`: the admin token, and the failure budgets of claiming
  codes and admin tokens.
- :mod:`f2pipe.pki.store`: the certificate register in PostgreSQL.
- :mod:`f2pipe.pki.revocation`: CRL reload and closing revoked sessions.
- :mod:`f2pipe.pki.renewal`: the CRL kept alive while certgen serves.
- :mod:`f2pipe.pki.expiry`: when the CRL and the CA run out (metrics, status).
- :mod:`f2pipe.pki.local`: operations on the CA host without HTTP.
- :mod:`f2pipe.pki.cli`: ``f2pipe certgen init | serve | issue-service |
  issue-device | revoke``.

Nothing is imported here: each caller names the module it needs, so a tool that
needs a certificate loads neither FastAPI, paho nor a database client.
"""
