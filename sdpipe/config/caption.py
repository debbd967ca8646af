"""`caption`: filling in missing captions, and `CaptionOps`, the caption changes applied at training time."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sdpipe.config.section import Section

TEMPLATE_FIELDS = ("token", "class_word")


class CaptionParams(Section):
    backend: Literal["template", "filename", "blip"] = "template"
    """How a missing caption is made: `template` (the `template` text), `filename` (words of the source
    file name, `red_circle-02.png` → `red circle`) or `blip` (a BLIP image captioning model)."""

    overwrite: bool = False
    """Re-caption every image with `backend`, replacing captions that came with the dataset (.txt sidecars
    or metadata). When false, existing captions are kept and only missing ones are made."""

    template: str = "a {token} {class_word}"
    """The caption for the `template` backend; `{token}` and `{class_word}` are replaced by those fields."""

    token: str = Field(default="sks", min_length=1)
    """The rare word that names the new concept (DreamBooth's identifier), used by `template`."""

    class_word: str = "shape"
    """The word for the concept's class (e.g. `dog`, `person`, `shape`), used by `template`."""

    blip_model: str | None = None
    """For the `blip` backend: a local BLIP captioning model folder, or a hub id such as
    `Salesforce/blip-image-captioning-base` (needs the network or the Hugging Face cache)."""

    blip_max_new_tokens: int = Field(default=30, ge=1, le=512)
    """For `blip`: the most tokens generated per caption (greedy decoding)."""

    blip_batch_size: int = Field(default=16, ge=1)
    """For `blip`: images captioned per forward pass."""

    blip_prefix: str | None = None
    """For `blip`: text the caption must start with and that the model continues (conditional
    captioning), e.g. `a photo of`. None: unconditional captioning."""

    @field_validator("template")
    @classmethod
    def _template_uses_known_fields(cls, template: str) -> str:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:
            raise ValueError(f"caption.template is not a valid template ({error}); write literal braces as {{{{ }}}}")
        known = ", ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
        for field in fields:
            if field not in TEMPLATE_FIELDS:
                raise ValueError(f"caption.template uses unknown field {{{field}}}; the known fields are {known}")
        return template

    @model_validator(mode="after")
    def _blip_needs_a_model(self) -> CaptionParams:
        if self.backend == "blip" and not self.blip_model:
            raise ValueError(
                "caption.blip_model is required when caption.backend is `blip`: "
                "a local BLIP model folder or a hub id such as Salesforce/blip-image-captioning-base"
            )
        return self


class CaptionOps(Section):
    """Caption changes made each time a caption is used in training (the `train` section embeds this).

    Captions are treated as comma-separated tags (`sks, red, circle, outlined`). The defaults change nothing.
    """

    trigger: str | None = None
    """A trigger word put first as `<trigger>, ` unless the caption already contains it as a word. The tag
    holding the trigger is always kept: never shuffled, never dropped."""

    shuffle_tags: bool = False
    """Shuffle the order of the tags each time (except the kept ones), so no tag owes its meaning to its place."""

    keep_tokens: int = Field(default=0, ge=0)
    """How many leading tags of the caption stay in place and are never dropped. A prepended trigger is kept
    in addition to these."""

    tag_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """The probability of dropping each tag that is not kept."""

    caption_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """The probability of replacing the whole caption (trigger included) by the empty string, which trains
    the unconditional prediction used by classifier-free guidance."""

    @field_validator("trigger")
    @classmethod
    def _trigger_is_one_tag(cls, trigger: str | None) -> str | None:
        if trigger is not None and (not trigger.strip() or "," in trigger):
            raise ValueError("trigger must be a non-empty word or phrase without commas")
        return trigger.strip() if trigger is not None else None
