"""Checkpoint merging by recipe (the `merge` stage).

- `sources`: merge inputs (diffusers folders, original-layout single files) read one tensor at a time under the
  original Stable Diffusion keys;
- `methods`: the tensor math of each method (weighted sum, add difference, triple sum, sum twice, SLERP, TIES,
  DARE, cosine-adaptive), one tensor at a time;
- `blocks`: per-block weights in supermerger's MBW convention;
- `output`: a streaming safetensors writer and the diffusers folder written from the merged single file;
- `lora`: LoRA recipes: baking LoRAs into a model, extracting a LoRA from two models, resizing a LoRA (SVD);
- `recipe`: resolving a recipe's inputs and running it into `<paths.merge>/<recipe>/`.

Nothing here imports torch at package import time, so `sdpipe.config` can use `blocks`.
"""
