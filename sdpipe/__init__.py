"""sdpipe: a declarative, reproducible build system for Stable Diffusion customization."""

__version__ = "0.1.0"
