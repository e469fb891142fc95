"""Diffusion Studio: `python app.py [--model ID_OR_PATH] [--lora FILE_OR_REPO] [--host H] [--port P]
[--public] [--allow-model SOURCE ...] [--allow-lora NAME=SOURCE ...]` (the same as `studio serve`)."""
from __future__ import annotations

try:  # on a ZeroGPU Space `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

from app.cli import serve, serve_parser


def main() -> None:
    serve(serve_parser().parse_args())


if __name__ == "__main__":
    main()
