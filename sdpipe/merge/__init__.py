"""Checkpoint merging by recipe (the `merge` stage).

- `sources`: merge inputs (diffusers folders, original-layout single files; SD 1.x/2.x or SDXL) read one tensor at a
  time under the original Stable Diffusion keys (SDXL's: the SGM layout);
- `methods`: the tensor math of each method (weighted sum, add difference, triple sum, sum twice, SLERP, TIES,
  DARE, cosine-adaptive), one tensor at a time;
- `blocks`: per-block weights in supermerger's MBW convention (SD's 26 blocks, SDXL's 20);
- `output`: a streaming safetensors writer and the diffusers folder written from the merged single file;
- `lora`: LoRA recipes: baking LoRAs into a model, extracting a LoRA from two models, resizing a LoRA (SVD);
- `recipe`: resolving a recipe's inputs and running it into `<paths.merge>/<recipe>/`.

Nothing here imports torch at package import time, so `sdpipe.config` can use `blocks`.
"""
