"""`studio`: the command line. `studio serve` runs the web studio (as `python app.py`); the other commands run one
job headless and write PNGs that carry the same parameters as the UI's downloads (pipelines/core/metadata.py).

Each job command's options are the fields of its parameter dataclass (`--steps`, `--guidance`, ...), so the command
line always offers what the pipeline accepts, with the pipeline's own defaults and checks; drag and sdedit options
left out take the model's recommended values (pipelines/recommended.py), as the UI's controls start there.

    studio generate --prompt "a red circle" --seed 7 --out circle.png
    studio invert --image photo.png --method nti --out recon.png
    studio edit --image photo.png --source-prompt "a red circle" --target-prompt "a blue circle" --out edit.png
    studio instruct --image photo.png --instruction "make it blue" --out blue.png
    studio diffedit --image photo.png --target-prompt "a blue square" --out diffedit.png
    studio sdedit --image sketch.png --prompt "a red circle" --repeats 3 --out sdedit.png
    studio drag --image photo.png --points 20,30,40,30 --out drag.png
    studio interpolate --prompt-a "a red circle" --prompt-b "a blue square" --frames 11 --out frames.png
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

try:  # on a ZeroGPU Space `spaces` must be imported before torch, which the job commands' parsers import
    import spaces  # noqa: F401
except ImportError:
    pass

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- serve
def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    import os

    parser = parser or argparse.ArgumentParser(prog="studio serve", description="Run the web studio")
    parser.add_argument("--model", help="Hub id, local diffusers folder, 'embedded' or 'tiny-random' "
                                        "(default: $STUDIO_MODEL, else the embedded model, else tiny-random)")
    parser.add_argument("--lora", help="a LoRA to load at start (.safetensors path or Hub repo[:file])")
    parser.add_argument("--singdiffusion", metavar="FOLDER", help="a SingDiffusion module folder for the model "
                        "(config.json + diffusion_pytorch_model.safetensors; default: the model folder's "
                        "singdiffusion/, else $STUDIO_SINGDIFFUSION)")
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
    return parser


def serve(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO)

    from app.hosting import Hosting
    from pipelines.core.errors import InputError
    from pipelines.core.events import run_to_end
    from pipelines.core.limits import Limits, set_limits
    from pipelines.studio import Studio

    set_limits(Limits.from_env())
    hosting = Hosting.from_env(args.public, args.allow_model, args.allow_lora)
    studio = Studio().start(args.model or (hosting.models[0] if hosting.public and hosting.models else None))
    if args.lora:
        try:
            run_to_end(studio.load_lora(args.lora))
        except InputError as exc:
            studio.notice = (studio.notice + " " if studio.notice else "") + f"LoRA not loaded: {exc}"
    if args.singdiffusion:
        try:
            run_to_end(studio.load_singdiffusion(args.singdiffusion))
        except InputError as exc:
            studio.notice = (studio.notice + " " if studio.notice else "") + f"SingDiffusion module not loaded: {exc}"
    if hosting.public:
        hosting.preload(studio)
    launch(studio, hosting, host=args.host, port=args.port)


def launch(studio, hosting=None, host: str = "127.0.0.1", port: int | None = None, **extra):
    """The studio's Blocks with the production queue and launch settings, served on host:port (a free port when
    None); `extra` goes to demo.launch (e.g. prevent_thread_lock=True). Returns the demo."""
    import socket

    from app.hosting import calm_queue, launch_kwargs, queue_kwargs
    from app.sessions import SessionRegistry
    from app.ui import build_demo

    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    sessions = SessionRegistry()
    demo = build_demo(studio, sessions, hosting)
    demo.queue(**queue_kwargs())
    calm_queue(demo)
    demo.launch(server_name=host, server_port=port, **extra, **launch_kwargs(sessions))
    return demo


# ---------------------------------------------------------------------------------------------- job commands
@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    params: str                     # "module:Class" of the parameter dataclass (imported when the command runs)
    method: str                     # the Studio method that runs the job
    images: tuple[str, ...] = ()    # input image options, in the method's positional order
    mask: bool = False              # the method takes an optional mask (--mask FILE: white = selected)
    skip: tuple[str, ...] = ()      # dataclass fields not offered (set by dedicated options)


COMMANDS = (
    Command("generate", "text-to-image", "pipelines.generate:GenerateParams", "generate"),
    Command("invert", "invert an image and reconstruct it (DDIM, null-text or negative-prompt inversion)",
            "pipelines.inversion:InversionParams", "invert", images=("image",)),
    Command("edit", "edit a real image by prompt: threshold-r switch or Prompt-to-Prompt",
            "pipelines.edit:EditParams", "edit", images=("image",), skip=("p2p",)),
    Command("instruct", "InstructPix2Pix: edit by an instruction (needs an InstructPix2Pix model)",
            "pipelines.instruct:InstructParams", "instruct", images=("image",)),
    Command("diffedit", "DiffEdit: estimate a mask from two prompts (or take --mask) and edit inside it",
            "pipelines.diffedit:DiffEditParams", "diffedit", images=("image",), mask=True),
    Command("sdedit", "SDEdit: repaint a guide image or sketch (inside --mask only, if given)",
            "pipelines.sdedit:SDEditParams", "sdedit", images=("image",), mask=True),
    Command("drag", "DragDiffusion: move handle points to targets (--points hx,hy,tx,ty[,...])",
            "pipelines.drag:DragParams", "drag", images=("image",), mask=True, skip=("handles", "targets")),
    Command("interpolate", "Smooth Diffusion seed interpolation: frames between two seeds/prompts",
            "pipelines.interpolation:InterpolationParams", "interpolation_sequence"),
)


def _field_parser(annotation) -> tuple[type | None, bool]:
    """(scalar type, optional) of a dataclass field annotation such as "int | None"; (None, _) if not a scalar."""
    if isinstance(annotation, str):
        names = {"int": int, "float": float, "str": str, "bool": bool}
        parts = [part.strip() for part in annotation.split("|")]
        optional = "None" in parts
        kinds = [names.get(part) for part in parts if part != "None"]
        return (kinds[0] if len(kinds) == 1 else None), optional
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        return (kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, str, bool) else None), True
    return (annotation if annotation in (int, float, str, bool) else None), False


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _resolve(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


GIVEN = "given_options"   # the namespace attribute naming the parameter options the caller gave


class _Given(argparse.Action):
    """Stores the value and notes that the caller gave it: the ones left out may take the model's recommended
    value (pipelines/recommended.py)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, {*(getattr(namespace, GIVEN, None) or ()), self.dest})


def add_param_options(parser: argparse.ArgumentParser, params_cls, skip=(), recommendable=()) -> list[str]:
    """One `--field-name` option per scalar field of `params_cls`, defaulting to the dataclass default (fields in
    `recommendable` to the model's recommended value when it has one); returns the field names offered."""
    offered = []
    for f in dataclasses.fields(params_cls):
        if f.name in skip or f.name == "lora" or not f.init:  # --lora names the adapter (build_parser)
            continue
        kind, optional = _field_parser(f.type)
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        conv = _bool if kind is bool else kind
        help_text = f"default: {default!r}" + (" (none)" if optional and default is None else "")
        if f.name in recommendable:
            help_text = f"default: the model's recommended value, else {default!r}"
        parser.add_argument(flag, dest=f.name, type=conv, default=default, metavar=kind.__name__.upper(),
                            help=help_text, action=_Given)
        offered.append(f.name)
    return offered


def _parse_points(text: str) -> tuple[list, list]:
    from pipelines.drag import parse_points

    try:
        numbers = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise SystemExit("--points: numbers separated by commas: hx,hy,tx,ty[,hx,hy,tx,ty ...]") from None
    points = parse_points([numbers[i:i + 2] for i in range(0, len(numbers), 2)] if len(numbers) % 2 == 0
                          else [numbers])  # an odd count: parse_points says what is wrong
    return points[0::2], points[1::2]


def _load_mask(path: str):
    import numpy as np

    from pipelines.core.image_io import load_rgb

    return np.asarray(load_rgb(path).convert("L")) > 127


def _images_of(result) -> list:
    """The ImageResult-like objects (an `image` PIL image carrying its parameters) a job's result holds, in order."""
    from PIL import Image

    if result is None:
        return []
    if isinstance(getattr(result, "image", None), Image.Image):
        return [result]
    for name in ("edited", "image", "reconstruction"):
        inner = getattr(result, name, None)
        if inner is not None and not isinstance(inner, Image.Image):
            return _images_of(inner)
    for name in ("images", "frames"):
        items = getattr(result, name, None)
        if items:
            return [found for item in items for found in _images_of(item)] or [
                _Bare(item) for item in items if isinstance(item, Image.Image)]
    return []


@dataclasses.dataclass
class _Bare:
    image: object


def _out_paths(out: Path, n: int) -> list[Path]:
    if n <= 1:
        return [out]
    return [out.with_name(f"{out.stem}_{k:03d}{out.suffix}") for k in range(n)]


def run_command(cmd: Command, args: argparse.Namespace, offered: list[str]) -> list[Path]:
    from pipelines.core.events import run_to_end
    from pipelines.core.metadata import save_png
    from pipelines.recommended import METHODS as RECOMMENDED
    from pipelines.recommended import recommended
    from pipelines.studio import Studio

    params_cls = _resolve(cmd.params)
    values = {name: getattr(args, name) for name in offered}
    if cmd.name == "drag":
        values["handles"], values["targets"] = _parse_points(args.points)

    studio = Studio().start(args.model)
    if studio.notice:
        print(studio.notice, file=sys.stderr)
    if getattr(args, "singdiffusion", None):
        run_to_end(studio.load_singdiffusion(args.singdiffusion))
    if cmd.name in RECOMMENDED:  # the options left out take the model's recommended values
        given = getattr(args, GIVEN, None) or set()
        values.update({k: v for k, v in recommended(studio.model, cmd.name).items() if k in offered and k not in given})
    params = params_cls(**values)
    if args.lora and "lora" in {f.name for f in dataclasses.fields(params_cls)}:
        # an adapter the model already has (the embedded model's "smooth"), or a LoRA file / Hub repo to load
        adapter = args.lora if args.lora in studio.model.loras else run_to_end(studio.load_lora(args.lora))
        params = dataclasses.replace(params, lora=adapter)
    positional = [args.image] if cmd.images else []
    kwargs = {}
    if cmd.mask and args.mask:
        kwargs["mask"] = _load_mask(args.mask)
    if cmd.name == "interpolate":
        kwargs["n_frames"] = args.frames
    job = getattr(studio, cmd.method)(*positional, params, **kwargs)

    last_stage = None
    result = None
    for ev in job:
        if ev.stage != last_stage and not args.quiet:
            print(ev.stage, file=sys.stderr)
            last_stage = ev.stage
        if ev.result is not None:
            result = ev.result
    found = _images_of(result)
    if not found:
        raise SystemExit(f"{cmd.name}: the job returned no image.")
    paths = _out_paths(Path(args.out), len(found))
    for item, path in zip(found, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(item.image, path)
        print(path)
    return paths


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from pipelines.recommended import METHODS as RECOMMENDED
    from pipelines.recommended import reference

    parser = argparse.ArgumentParser(prog="studio", description="Diffusion Studio: the web studio and headless jobs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser(sub.add_parser("serve", help="run the web studio (as python app.py)",
                                description="Run the web studio"))
    offered = {}
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--model", help="Hub id, diffusers folder, 'embedded' or 'tiny-random' "
                                       "(default: $STUDIO_MODEL, else the embedded model)")
        p.add_argument("--lora", help="apply a LoRA: a loaded adapter's name (the embedded model's Smooth LoRA is "
                                      "'smooth'), a .safetensors file or a Hub repo[:file]")
        p.add_argument("--out", required=True, help="the PNG to write (several images: NAME_000.png, ...)")
        if cmd.name in ("generate", "interpolate"):
            p.add_argument("--singdiffusion", metavar="FOLDER", help="a SingDiffusion module folder for "
                           "--singular-step true (default: the model folder's singdiffusion/, else "
                           "$STUDIO_SINGDIFFUSION)")
        p.add_argument("--quiet", action="store_true", help="print only the written paths")
        for name in cmd.images:
            p.add_argument(f"--{name}", required=True, help="input image file")
        if cmd.mask:
            p.add_argument("--mask", help="mask image (white = selected region), any size")
        if cmd.name == "drag":
            p.add_argument("--points", required=True, help="handle/target pixels: hx,hy,tx,ty[,hx,hy,tx,ty ...]")
        if cmd.name == "interpolate":
            p.add_argument("--frames", type=int, default=11, help="number of frames, ends included (default 11)")
        offered[cmd.name] = add_param_options(p, _resolve(cmd.params), cmd.skip,
                                              reference(cmd.name) if cmd.name in RECOMMENDED else ())
    return parser, offered


def main(argv: list[str] | None = None) -> int:
    parser, offered = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
        return 0
    from pipelines.core.errors import InputError

    cmd = next(c for c in COMMANDS if c.name == args.command)
    try:
        run_command(cmd, args, offered[cmd.name])
    except InputError as exc:  # the pipelines' own messages for bad input
        print(f"studio {cmd.name}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
