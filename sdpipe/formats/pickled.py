"""Legacy pickled model files (`.pt`, `.ckpt`, `.pth`, `.bin`), read without ever running their code.

Unpickling can call any function the file names (`os.system`, ...). `torch.load(weights_only=True)` only
rebuilds tensors and plain containers (dict, list, str, numbers) and refuses everything else, so a file
that needs more (a pickled class, a function) is refused here with an `SdpipeError`, never loaded another way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError

PICKLE_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")


def load_pickled(path: str | Path) -> object:
    """The content of a legacy PyTorch file, read with `torch.load(weights_only=True)` on the CPU.

    Raises `SdpipeError` naming the file when it needs code to load or is not a PyTorch file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise SdpipeError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # garbage makes the weights-only unpickler fail in many ways; none of them runs code
        raise SdpipeError(
            f"{path}: refused: it cannot be read with torch.load(weights_only=True) ({refusal_reason(error)}). "
            "It is not a PyTorch file, or it needs code to load (pickled classes or functions), and sdpipe never "
            "unpickles such files: they can run anything. Convert it to .safetensors with a tool you trust."
        ) from None


def refusal_reason(error: BaseException) -> str:
    """The one line of torch's long weights-only message that says what was refused."""
    message = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it calls or builds {found[1]}"
    lines = [line.strip() for line in message.splitlines() if line.strip() and "torch.load" not in line]
    return f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__


def find_state_dict(content: object) -> dict[str, torch.Tensor] | None:
    """The tensors of a loaded checkpoint: the top-level dict, or the one under `state_dict` (Lightning `.ckpt`)."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        return None
    tensors = {key: value for key, value in content.items() if isinstance(key, str) and torch.is_tensor(value)}
    return tensors or None
