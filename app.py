"""Diffusion Studio: `python app.py [--model ID_OR_PATH] [--lora FILE_OR_REPO] [--host H] [--port P]`."""
from __future__ import annotations

import argparse
import logging
import os


def main() -> None:
    parser = argparse.ArgumentParser(description="Interactive diffusion image-editing studio")
    parser.add_argument("--model", help="Hub id, local diffusers folder, 'embedded' or 'tiny-random' "
                                        "(default: $STUDIO_MODEL, else the embedded model, else tiny-random)")
    parser.add_argument("--lora", help="a LoRA to load at start (.safetensors path or Hub repo[:file])")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from app.sessions import SessionRegistry
    from app.ui import build_demo
    from pipelines.errors import InputError
    from pipelines.events import run_to_end
    from pipelines.studio import Studio

    studio = Studio().start(args.model)
    if args.lora:
        try:
            run_to_end(studio.load_lora(args.lora))
        except InputError as exc:
            studio.notice = (studio.notice + " " if studio.notice else "") + f"LoRA not loaded: {exc}"
    demo = build_demo(studio, SessionRegistry())
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="40mb", show_error=True, footer_links=["api", "settings"])


if __name__ == "__main__":
    main()
