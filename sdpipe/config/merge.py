"""`merge`: checkpoint merge recipes, each written to `artifacts/merge/<recipe>/`."""

from pydantic import Field, field_validator

from sdpipe.config.section import Section


class MergeParams(Section):
    recipes: list[dict] = Field(default_factory=list)
    """Merge recipes to run. Merging is not available in this version: the list must be empty."""

    @field_validator("recipes")
    @classmethod
    def _no_recipes_yet(cls, recipes: list[dict]) -> list[dict]:
        if recipes:
            raise ValueError("merge recipes are not available in this version; leave merge.recipes empty")
        return recipes
