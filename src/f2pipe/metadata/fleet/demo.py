"""The demo fleet of SPEC section 3: a fleet document shipped with the package.

``deploy/fleet.example.yaml`` is the same file written out (a test holds them
equal). Reading it needs no database: the seed (:func:`f2pipe.metadata.database.seed_demo`)
writes it through the importer, and the simulator and ``status`` read its
controllers and templates.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from f2pipe.metadata.fleet.document import Fleet
from f2pipe.metadata.fleet.yamlload import parse_fleet

__all__ = ["DEMO_FLEET", "demo_fleet"]

DEMO_FLEET = "demo-fleet.yaml"  # beside f2pipe/metadata/__init__.py


@cache
def demo_fleet() -> Fleet:
    """The demo fleet document, parsed once per process (the model is frozen).

    Entries are listed in the order the demo was always created in, so a seeded
    empty database numbers its rows as before (Living Room Env Sensor is device 5).
    """
    text = (resources.files("f2pipe.metadata") / DEMO_FLEET).read_text(encoding="utf-8")
    return parse_fleet(text, DEMO_FLEET)
