"""Which datasets a method trains on: `train.<method>.datasets`, checked against `base.datasets`."""

from __future__ import annotations

from sdpipe.errors import SdpipeError


def method_datasets(base_datasets: list[str], chosen: list[str] | None, key: str) -> list[str]:
    """The datasets a method trains on: its own choice, which must be prepared (in `base.datasets`), or all of them.
    `key` is the method's params key (`train.lora`), for the errors."""
    if chosen is None:
        return list(base_datasets)
    missing = [name for name in chosen if name not in base_datasets]
    if missing:
        raise SdpipeError(
            f"{key}.datasets lists {', '.join(missing)}, which base.datasets ({', '.join(base_datasets)}) does not; "
            "only datasets in base.datasets are prepared, captioned and encoded"
        )
    if not chosen:
        raise SdpipeError(f"{key}.datasets is empty; list at least one dataset of base.datasets, or null for all")
    return list(chosen)
