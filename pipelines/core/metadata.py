"""Generation parameters embedded in PNG text chunks.

Two chunks are written: ``parameters`` in the AUTOMATIC1111 text format, so
other tools (A1111, ComfyUI readers, civitai) can show them, and ``studio``
with the exact params as JSON, which is what we read back first because it
keeps types and needs no parsing heuristics.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.core.errors import InputError

_NEGATIVE = "Negative prompt:"
# One "Key: value" pair as A1111 writes it; quoted values may contain , : and \".
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _title_key(key: str) -> str:
    # snake_case -> "Title case words", the style A1111 uses ("Lora strength").
    words = str(key).replace("_", " ")
    return words[:1].upper() + words[1:]


def _snake_key(key: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", key.strip().lower()).strip("_")


def _quote(value) -> str:
    text = str(value)
    # A leading quote is quoted too, otherwise reading back would strip it.
    if any(ch in text for ch in ",:\n") or text.startswith('"'):
        # json.dumps gives the same quoting/escaping A1111 uses (\" and \n).
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text[1:-1]
    return text


def format_parameters(params: dict) -> str:
    """A1111-style text: prompt, optional negative prompt, then "Key: value, ..."."""
    lines = [str(params.get("prompt", ""))]
    negative = params.get("negative_prompt")
    if negative:
        lines.append(f"{_NEGATIVE} {negative}")
    pairs = [
        f"{_title_key(k)}: {_quote(v)}"
        for k, v in params.items()
        if k not in ("prompt", "negative_prompt")
    ]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _parse_pairs(line: str) -> dict | None:
    """Parse a whole line of pairs, or return None if it is not one (e.g. prompt text)."""
    out, pos = {}, 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if m is None or m.end() == pos:
            return None
        out[_snake_key(m.group(1))] = _unquote(m.group(2))
        pos = m.end()
    return out or None


def parse_parameters(text: str) -> dict:
    """Inverse of ``format_parameters``; values stay strings.

    The last line counts as the key/value line only if it parses completely,
    so a prompt like "a cat, sitting" is never mistaken for parameters.
    """
    if not text.strip():
        return {}
    lines = text.strip("\n").split("\n")
    last = lines[-1]
    pairs = None if last.startswith(_NEGATIVE) else _parse_pairs(last)
    if pairs is not None:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].lstrip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt)}
    if in_negative:
        result["negative_prompt"] = "\n".join(negative)
    result.update(pairs or {})
    return result


def with_metadata(img: Image.Image, params: dict) -> Image.Image:
    """Copy of ``img`` whose ``.info`` carries "parameters" and "studio" text.

    Gradio's PNG encoder turns str entries of ``img.info`` into text chunks,
    so returning this image from a handler is enough to embed the metadata.
    """
    out = img.copy()  # copy() also copies .info; the caller's image is untouched
    out.info["parameters"] = format_parameters(params)
    # default=str: numpy ints, Paths etc. must not break saving an image.
    out.info["studio"] = json.dumps(
        params, sort_keys=False, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return out


def save_png(img: Image.Image, path) -> Path:
    """Write ``img`` as PNG with every str entry of ``img.info`` as a text chunk."""
    info = PngInfo()
    for key, value in img.info.items():
        if isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)  # falls back to iTXt for non-latin-1 text
    path = Path(path)
    img.save(path, format="PNG", pnginfo=info)
    return path


def read_metadata(source) -> dict:
    """Params from a PNG path, bytes or PIL image: "studio" JSON first, then the
    A1111 "parameters" text, else ``{}``. Raises InputError for unreadable files."""
    if isinstance(source, Image.Image):
        return _metadata_from_image(source)
    try:
        fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(fp) as img:
            return _metadata_from_image(img)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing file, not an image, corrupt...
        raise InputError("The file is not an image I can read metadata from.") from exc


def _metadata_from_image(img: Image.Image) -> dict:
    chunks = {k: v for k, v in img.info.items() if isinstance(v, str)}
    if "studio" not in chunks and "parameters" not in chunks:
        # Text chunks after the pixel data only appear once the PNG is read fully.
        try:
            chunks.update(getattr(img, "text", {}) or {})
        except Exception:  # noqa: BLE001 - truncated tail: keep what the header had
            pass
    studio = chunks.get("studio")
    if studio is not None:
        try:
            data = json.loads(studio)
        except json.JSONDecodeError:
            data = None  # corrupt JSON: fall back to the A1111 text
        if isinstance(data, dict):
            return data
    parameters = chunks.get("parameters")
    if parameters is not None:
        return parse_parameters(parameters)
    return {}
