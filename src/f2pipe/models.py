"""The shared data models, used at the service boundaries (HTTP bodies, Kafka values).

Hot paths (the processor's decode loop, the sink's COPY) work on plain tuples and
bytes; these models validate what crosses a boundary and document its shape.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Reading(BaseModel):
    """One decoded reading: the value of ``processed-iot-data`` (SPEC section 4), version 1."""

    model_config = ConfigDict(frozen=True)

    v: int = Field(default=1, ge=1, le=1)
    ts: AwareDatetime
    device_id: int = Field(ge=1)
    datapoint_id: int = Field(ge=1)
    value: float


class DeviceLookup(BaseModel):
    """A controller found by MAC: what the processor caches per device."""

    model_config = ConfigDict(frozen=True)

    device_id: int
    mac_address: str = Field(pattern=r"^[0-9a-f]{12}$")
    timezone: str = "UTC"


class DatapointLookup(BaseModel):
    """One datapoint of a sensor's template, as the decoder needs it (SPEC section 2)."""

    model_config = ConfigDict(frozen=True)

    datapoint_id: int
    label: str
    data_encoding: str
    byte_offset: int = Field(ge=0)
    byte_length: int = Field(gt=0)
    byte_order: str = "ABCD"
    decimals: int = Field(default=0, ge=0, le=12)
    unit: str | None = None
    json_field: str | None = None


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
