"""Diffusion Studio: `python app.py [--model ID_OR_PATH] [--lora FILE_OR_REPO] [--host H] [--port P]
[--public] [--allow-model SOURCE ...] [--allow-lora NAME=SOURCE ...]`."""
from __future__ import annotations

import argparse
import logging
import os

try:  # on a ZeroGPU Space `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Interactive diffusion image-editing studio")
    parser.add_argument("--model", help="Hub id, local diffusers folder, 'embedded' or 'tiny-random' "
                                        "(default: $STUDIO_MODEL, else the embedded model, else tiny-random)")
    parser.add_argument("--lora", help="a LoRA to load at start (.safetensors path or Hub repo[:file])")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--public", action="store_true",
                        help="hosted mode (also on when $SPACE_ID is set): visitors choose only allow-listed "
                             "models and LoRAs, per session")
    parser.add_argument("--allow-model", action="append", default=[], metavar="SOURCE",
                        help="hosted mode: a model visitors may choose (repeatable; also $STUDIO_ALLOWED_MODELS)")
    parser.add_argument("--allow-lora", action="append", default=[], metavar="NAME=SOURCE",
                        help="hosted mode: a LoRA visitors may apply, by NAME (repeatable; also "
                             "$STUDIO_ALLOWED_LORAS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from app.hosting import Hosting, launch_kwargs, queue_kwargs
    from app.sessions import SessionRegistry
    from app.ui import build_demo
    from pipelines.errors import InputError
    from pipelines.events import run_to_end
    from pipelines.limits import Limits, set_limits
    from pipelines.studio import Studio

    set_limits(Limits.from_env())
    hosting = Hosting.from_env(args.public, args.allow_model, args.allow_lora)
    studio = Studio().start(args.model or (hosting.models[0] if hosting.public and hosting.models else None))
    if args.lora:
        try:
            run_to_end(studio.load_lora(args.lora))
        except InputError as exc:
            studio.notice = (studio.notice + " " if studio.notice else "") + f"LoRA not loaded: {exc}"
    if hosting.public:
        hosting.preload(studio)
    sessions = SessionRegistry()
    demo = build_demo(studio, sessions, hosting)
    demo.queue(**queue_kwargs())
    demo.launch(server_name=args.host, server_port=args.port, **launch_kwargs(sessions))


if __name__ == "__main__":
    main()
