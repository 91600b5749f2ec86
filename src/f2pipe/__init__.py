"""f2pipe: telemetry from F2 Smart Controllers, over mTLS MQTT and Kafka, into TimescaleDB.

The public surface is what ``__all__`` names: the decoding core (topics, frames,
decoding, reasons, the processed record's key and value), the settings, and the
package's exception base. Everything else is private by convention and may move.
Names are loaded on first use, so ``import f2pipe`` stays cheap for quick tools.
"""

import importlib as _importlib
import typing as _typing

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CompiledTemplate": "f2pipe.core.decode",
    "DatapointSpec": "f2pipe.core.decode",
    "DecodeError": "f2pipe.core.decode",
    "TemplateSpec": "f2pipe.core.decode",
    "compile_template": "f2pipe.core.decode",
    "parse_timestamp": "f2pipe.core.decode",
    "template_from_mapping": "f2pipe.core.decode",
    "Rejected": "f2pipe.core.deadletter",
    "check_modbus_frame": "f2pipe.core.frames",
    "crc16_modbus": "f2pipe.core.frames",
    "Reason": "f2pipe.core.reasons",
    "reading_key": "f2pipe.core.records",
    "reading_value": "f2pipe.core.records",
    "Topic": "f2pipe.core.topics",
    "parse_topic": "f2pipe.core.topics",
    "F2PipeError": "f2pipe.errors",
    "Settings": "f2pipe.settings",
    "get_settings": "f2pipe.settings",
    "load_settings": "f2pipe.settings",
}

__all__ = [
    "CompiledTemplate",
    "DatapointSpec",
    "DecodeError",
    "F2PipeError",
    "Reason",
    "Rejected",
    "Settings",
    "TemplateSpec",
    "Topic",
    "__version__",
    "check_modbus_frame",
    "compile_template",
    "crc16_modbus",
    "get_settings",
    "load_settings",
    "parse_timestamp",
    "parse_topic",
    "reading_key",
    "reading_value",
    "template_from_mapping",
]

if _typing.TYPE_CHECKING:
    from f2pipe.core.deadletter import Rejected
    from f2pipe.core.decode import (
        CompiledTemplate,
        DatapointSpec,
        DecodeError,
        TemplateSpec,
        compile_template,
        parse_timestamp,
        template_from_mapping,
    )
    from f2pipe.core.frames import check_modbus_frame, crc16_modbus
    from f2pipe.core.reasons import Reason
    from f2pipe.core.records import reading_key, reading_value
    from f2pipe.core.topics import Topic, parse_topic
    from f2pipe.errors import F2PipeError
    from f2pipe.settings import Settings, get_settings, load_settings


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'f2pipe' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
