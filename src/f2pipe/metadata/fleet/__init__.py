"""Fleet descriptions: ``f2pipe fleet import FILE.yaml`` and ``f2pipe fleet export [FILE]``.

A fleet file is YAML with one version key and five lists::

    version: 1
    device_types:   [{name, is_controller, is_sensor}]
    templates:      [{name, device_type, model, description, frame_check,
                      datapoints: [{label, data_encoding, byte_offset, byte_length,
                                    byte_order, decimals, unit, json_field}]}]
    controllers:    [{name, mac, template, timezone, serial_number, claiming_code}]
    sensors:        [{name, template, serial_number}]
    wiring:         [{controller: <mac>, connector: 1..4, pin: 1..6, sensor: <name>}]

Identity on re-import (what an entry updates rather than creates):

- device types and templates by ``name`` (both unique in the schema);
- datapoints by ``(template, label)``;
- controllers by MAC (``aabbccddee01``, ``aa:bb:cc:dd:ee:01`` and ``aa-bb-...`` are
  the same controller);
- sensors by ``name`` among the devices that have no MAC. Sensor names must
  therefore be unique in the file, and an import refuses a name that more than
  one MAC-less device in the database already carries. Renaming a sensor in the
  file registers a new device (the old one keeps its id and its readings).

What the file names, it states completely: a template's datapoints are exactly
those listed (others of that template are deleted), and the wiring of every
controller in the file is exactly the file's wiring (pins it does not list are
removed; a changed entry rewires the pin). Whatever the file does not name
(other templates, controllers, sensors) is left as it is; nothing is deleted
except datapoints and pins as just said. A controller's ``claiming_code`` is set
when given and left unchanged when omitted.

A claiming code is a credential, so a weak one is refused (naming the
controller, never quoting the code): its strength is estimated as its length
times log2 of the size of the smallest standard alphabet holding all of its
characters (digits 10, hexadecimal 16, one-case letters 26, base32 32, one-case
letters and digits 36, letters and digits 62, base64url or base64 64, printable
ASCII 94), and must reach 64 bits; a character outside printable ASCII (a space
included) is refused. ``secrets.token_urlsafe(12)``, what ``seed-demo``
generates, is 16 characters of base64url: 96 bits.

Guarantees: the whole file is validated before anything is written (every
error names the file's line and the field); the import runs in one
transaction, so a database refusal leaves nothing half-written (and names the
entry's line); only rows that actually differ are written, so re-importing the
same file changes nothing (and wakes no processor cache). Rows are written in
bulk, a few thousand per statement. Export omits claiming codes unless asked,
because they are credentials.

A template's datapoints are :class:`f2pipe.core.models.Datapoint`, the one
validated datapoint shape.

The modules, by job: :mod:`.document` (the models and the reference checks),
:mod:`.yamlload` (YAML with lines, and where each problem is), :mod:`.importer`
(one locked transaction, only differing rows), :mod:`.bulk` (bulk statements that
still name the refused entry), :mod:`.exporter`, :mod:`.demo`
(the demo fleet document) and :mod:`.cli` (``f2pipe fleet``).
"""
