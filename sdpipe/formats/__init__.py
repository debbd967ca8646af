"""File formats of the wider Stable Diffusion ecosystem that sdpipe reads and writes (kohya/A1111/LyCORIS LoRA, ...)."""
