"""The base class every params.yaml section model derives from."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict params section: unknown keys are errors, and each field's docstring is its documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
