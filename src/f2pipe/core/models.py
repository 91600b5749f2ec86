"""The shared data models, used at the service boundaries (HTTP bodies, fleet files).

Hot paths (the processor's decode loop, the sink's COPY) work on plain tuples and
bytes; these models validate what crosses a boundary and document its shape.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from f2pipe.core.decode import BYTE_ORDERS, ENCODINGS, DatapointSpec


class Datapoint(BaseModel):
    """One datapoint of a template, as SPEC section 2 decodes it: the one validated shape.

    Fleet documents (and so the demo fleet) hold these. Strict and closed, because
    a datapoint is configuration: "2" for a number, or a misspelt key, is a mistake
    worth naming. The decoder works on :class:`~f2pipe.core.decode.DatapointSpec`,
    which adds the database id; :meth:`spec` is the conversion.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    label: str = Field(min_length=1)
    data_encoding: str
    byte_offset: int = Field(ge=0)
    byte_length: int = Field(gt=0)
    byte_order: str = "ABCD"
    decimals: int = Field(default=0, ge=0, le=12)
    unit: str | None = None
    json_field: str | None = None

    @field_validator("data_encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        if value.lower() not in ENCODINGS:
            raise ValueError(f"{value!r} is not one of {', '.join(ENCODINGS)}")
        return value.lower()

    @field_validator("byte_order")
    @classmethod
    def _order(cls, value: str) -> str:
        if value.upper() not in BYTE_ORDERS:
            raise ValueError(f"{value!r} is not one of {', '.join(BYTE_ORDERS)}")
        return value.upper()

    def spec(self, datapoint_id: int) -> DatapointSpec:
        """This datapoint as the decoder compiles it, under the metadata's ``datapoint_id``."""
        return DatapointSpec(
            datapoint_id,
            self.label,
            self.data_encoding,
            self.byte_offset,
            self.byte_length,
            self.byte_order,
            self.decimals,
            self.unit,
            self.json_field,
        )


class CertificateRequest(BaseModel):
    """Body of ``POST /v1/devices/{mac}/certificate`` (SPEC section 6); both fields optional.

    No ``csr``: the key pair is generated server-side and returned once. No
    ``claiming_code``: the caller must hold the admin token.
    """

    csr: str | None = Field(default=None, description="PEM certificate signing request")
    claiming_code: str | None = Field(default=None, description="the device's claiming code")


class CertificateResponse(BaseModel):
    """201 answer of the certificate endpoint; ``private_key`` is null when a CSR was sent."""

    mac: str
    common_name: str
    serial: str
    not_before: str = Field(description="ISO 8601, UTC")
    not_after: str = Field(description="ISO 8601, UTC")
    certificate: str
    ca_certificate: str
    private_key: str | None
    broker_url: str | None = Field(
        default=None,
        description="The MQTT broker this device belongs to (mqtts://host:port); null when"
        " its metadata names a broker certgen's settings do not know",
    )
