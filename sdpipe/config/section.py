"""The base class every params.yaml section model derives from."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict params section: unknown keys are errors, and each field's docstring is its documentation.

    Numbers must be finite: `.inf` and `.nan` are refused.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)
