"""`export`: ONNX export of a chosen model to `artifacts/export/onnx/<name>/`."""

from pydantic import field_validator

from sdpipe.config.section import Section


class ExportParams(Section):
    enabled: bool = False
    """Export to ONNX. Not available in this version: must be false."""

    @field_validator("enabled")
    @classmethod
    def _not_yet(cls, enabled: bool) -> bool:
        if enabled:
            raise ValueError("ONNX export is not available in this version; set export.enabled: false")
        return enabled
