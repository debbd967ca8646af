"""`paths`: where each stage reads and writes. dvc.yaml interpolates these, so each path is written once."""

from sdpipe.config.section import Section


class PathsParams(Section):
    datasets: str = "datasets"
    """Input datasets, one folder per dataset name."""
    prepared: str = "artifacts/prepared"
    """`prepare` output: `<prepared>/<name>/` with images, `manifest.jsonl` and `report.json`."""
    captions: str = "artifacts/captions"
    """`caption` output: `<captions>/<name>.jsonl`."""
    latents: str = "artifacts/latents"
    """`encode` output: `<latents>/<name>.safetensors`."""
    pretrain: str = "artifacts/pretrain/tinyworld"
    """`pretrain` output: the tiny-world base model (diffusers folder)."""
    pretrain_variations: str = "artifacts/pretrain/tinyworld_variations"
    """`pretrain` output: the tiny-world image-variations model (diffusers `StableDiffusionImageVariationPipeline`
    folder), the base of CLIP inversion."""
    pretrain_metrics: str = "artifacts/pretrain/metrics.json"
    """`pretrain` metrics: reconstruction error, CLIP retrieval accuracy, time per phase."""
    pretrain_xl: str = "artifacts/pretrain/tinyworld_xl"
    """`pretrain_xl` output: the tiny-world SDXL base model (diffusers `StableDiffusionXLPipeline` folder)."""
    pretrain_xl_metrics: str = "artifacts/pretrain/metrics_xl.json"
    """`pretrain_xl` metrics: the second text encoder's retrieval accuracy, time per phase."""
    pretrain_xl_clip: str = "artifacts/pretrain/tinyworld_xl_clip"
    """`pretrain_xl_clip` output: two CLIPs (`CLIPModel` folders `clip_l/`, `clip_g/`) whose text towers are the tiny
    SDXL's text encoders, the image side that aesthetic gradients need (SDXL 1.0's: CLIP ViT-L/14, OpenCLIP
    ViT-bigG/14)."""
    pretrain_xl_clip_metrics: str = "artifacts/pretrain/metrics_xl_clip.json"
    """`pretrain_xl_clip` metrics: that CLIP's retrieval accuracy and training time."""
    families: str = "artifacts/families"
    """What the stages of `base.extra_families` write: `<families>/<family>/latents`, `class_images`, `train`, `eval`."""
    class_images: str = "artifacts/class_images"
    """`class_images` output: DreamBooth's generated class images (`images/`, `manifest.jsonl`, and the
    `captions/class.jsonl` + `latents/class.safetensors` that training reads)."""
    train: str = "artifacts/train"
    """`train@<method>` output: `<train>/<method>/`."""
    checkpoints: str | None = None
    """Where each `train@<method>` keeps its resumable checkpoints: `<checkpoints>/<method>/`; null:
    `<train>/<method>/checkpoints/`. Not a DVC output (nothing to cache or compare) and, outside `<train>`, not part of
    what merge, evaluate and export depend on: an experiment's checkpoints do not make them run again."""
    merge: str = "artifacts/merge"
    """`merge` output: `<merge>/<recipe>/`."""
    eval: str = "artifacts/eval"
    """`evaluate` output."""
    export: str = "artifacts/export"
    """`export` output."""
