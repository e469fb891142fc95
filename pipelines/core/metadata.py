"""Generation parameters embedded in PNG text chunks.

Two chunks are written: ``parameters`` in the AUTOMATIC1111 text format, so
other tools (A1111, ComfyUI readers, civitai) can show them, and ``studio``
with the exact params as JSON, which is what we read back first because it
keeps types and needs no parsing heuristics.

The ``parameters`` text uses A1111's names wherever A1111 has the same setting
("CFG scale", "Denoising strength", "Image CFG scale", "Size: WxH"), and
reading maps them back to the studio's keys, so an A1111 PNG and a studio PNG
read the same way. Files are read chunk by chunk: only text chunks are decoded,
never the pixels.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from pipelines.core.errors import InputError

_NEGATIVE = "Negative prompt:"
# One "Key: value" pair as A1111 writes it; quoted values may contain , : and \"; a {...} value (civitai's
# "Hashes") may contain commas and quoted strings.
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|\{(?:[^{}"]|"(?:\\.|[^\\"])*")*\}|[^,]*)(?:,|$)')

# Studio key -> A1111's name for the same setting. Keys without one are written in A1111's style ("Lora strength").
A1111_NAMES = {
    "steps": "Steps",
    "sampler": "Sampler",
    "guidance": "CFG scale",
    "text_guidance": "CFG scale",        # InstructPix2Pix's text guidance is A1111's CFG scale there
    "image_guidance": "Image CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model": "Model",
    "strength": "Denoising strength",    # SDEdit's t0, as A1111's img2img strength
    "eta": "Eta DDIM",
}
# A1111 name -> studio key when reading (text_guidance comes back per task: _TASK_KEYS).
_FROM_A1111 = {name: key for key, name in A1111_NAMES.items() if key != "text_guidance"}
_TASK_KEYS = {"instruct": {"guidance": "text_guidance"}}

MAX_TEXT_BYTES = 256 * 1024     # a "parameters" or "studio" chunk longer than this is refused, not parsed
MAX_CHUNKS = 10_000             # chunks walked in one file before giving up on finding text
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_OURS = ("parameters", "studio")


def _title_key(key: str) -> str:
    # snake_case -> "Title case words", the style A1111 uses ("Lora strength").
    words = str(key).replace("_", " ")
    return words[:1].upper() + words[1:]


def text_name(key: str) -> str:
    """How a studio key is written in the ``parameters`` text: A1111's name when it has one."""
    return A1111_NAMES.get(key) or _title_key(key)


def _snake_key(key: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", key.strip().lower()).strip("_")


def _studio_key(name: str) -> str:
    name = name.strip()
    return _FROM_A1111.get(name) or _snake_key(name)


def _quote(value) -> str:
    text = str(value)
    # A leading quote or brace is quoted too, otherwise reading back would strip or split it.
    if any(ch in text for ch in ",:\n") or text.startswith(('"', "{")):
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
    """A1111-style text: prompt, optional negative prompt, then "Key: value, ..." with A1111's names."""
    lines = [str(params.get("prompt", ""))]
    negative = params.get("negative_prompt")
    if negative:
        lines.append(f"{_NEGATIVE} {negative}")
    pairs, used = [], set()
    for k, v in params.items():
        if k in ("prompt", "negative_prompt"):
            continue
        name = text_name(k)
        if name in used:  # two keys with one A1111 name (never in the studio's own params): the second keeps its own
            name = _title_key(k)
        used.add(name)
        pairs.append(f"{name}: {_quote(v)}")
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _parse_pairs(line: str) -> dict | None:
    """Parse a whole line of pairs, or return None if it is not one (e.g. prompt text). Like A1111, a line
    that only partly parses still counts when it has at least three pairs, one of them "Steps"."""
    out, pos = {}, 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if m is None or m.end() == pos:
            found = {name.strip(): value for name, value in _PAIR.findall(line)}
            if len(found) >= 3 and "Steps" in found:
                return {_studio_key(name): _unquote(value) for name, value in found.items()}
            return None
        out[_studio_key(m.group(1))] = _unquote(m.group(2))
        pos = m.end()
    return out or None


def parse_parameters(text: str) -> dict:
    """Inverse of ``format_parameters``; values stay strings, keys are the studio's ("CFG scale" -> guidance).

    The last line counts as the key/value line only if it parses, so a prompt
    like "a cat, sitting" is never mistaken for parameters.
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
    pairs = pairs or {}
    for key, own in _TASK_KEYS.get(str(pairs.get("task", "")), {}).items():
        if key in pairs and own not in pairs:
            pairs[own] = pairs.pop(key)
    result.update(pairs)
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


def read_png_text(fp, max_text: int = MAX_TEXT_BYTES) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file object, found by walking its chunks with Pillow's own
    chunk reader: pixel data is skipped, never decompressed. A "parameters" or "studio" chunk larger than
    `max_text` raises InputError; other large text chunks (XMP and the like) are skipped."""
    if fp.read(8) != _PNG_SIGNATURE:
        raise InputError("The file is not a PNG.")
    stream = PngImagePlugin.PngStream(fp)
    try:
        for _ in range(MAX_CHUNKS):
            cid, pos, length = stream.read()
            if cid == b"IEND":
                break
            if cid in _TEXT_CHUNKS and length <= max_text:
                stream.crc(cid, stream.call(cid, pos, length))
            else:
                keyword = fp.read(len("parameters") + 1).split(b"\0")[0] if cid in _TEXT_CHUNKS else b""
                if keyword.decode("latin-1") in _OURS:
                    raise InputError(f"The PNG's parameters text is too long ({length // 1024} KB; the studio "
                                     f"reads at most {max_text // 1024} KB).")
                fp.seek(pos + length + 4)  # the chunk's data and CRC, unread
    except InputError:
        raise
    except ValueError as exc:  # a compressed text inflating past Pillow's limit (MAX_TEXT_CHUNK)
        raise InputError(f"The PNG's text is too long (over {max_text // 1024} KB once decompressed).") from exc
    except (EOFError, SyntaxError, OSError, zlib.error, UnicodeError) as exc:
        # truncated file or a broken chunk: keep what was read, unless nothing
        if not stream.im_text:
            raise InputError("The PNG is damaged: its text could not be read.") from exc
    finally:
        stream.close()
    text = {str(k): str(v) for k, v in stream.im_text.items()}
    for key in _OURS:
        if len(text.get(key, "")) > max_text:  # compressed chunks are only known to be too long once inflated
            raise InputError(f"The PNG's parameters text is too long (over {max_text // 1024} KB).")
    return text


def read_metadata(source) -> dict:
    """Params from a PNG path, bytes or PIL image: "studio" JSON first, then the
    A1111 "parameters" text, else ``{}``. Raises InputError for unreadable files."""
    if isinstance(source, Image.Image):
        return params_from_text(_image_text(source))
    try:
        fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else open(source, "rb")  # noqa: SIM115
    except Exception as exc:  # noqa: BLE001 - missing file, a directory, a bad path
        raise InputError("The file is not an image I can read metadata from.") from exc
    with fp:
        head = fp.read(8)
        fp.seek(0)
        if head == _PNG_SIGNATURE:
            return params_from_text(read_png_text(fp))
        try:  # another format: only what its header holds (Image.open decodes no pixels)
            with Image.open(fp) as img:
                return params_from_text({k: v for k, v in img.info.items() if isinstance(v, str)})
        except Exception as exc:  # noqa: BLE001 - not an image, corrupt...
            raise InputError("The file is not an image I can read metadata from.") from exc


def _image_text(img: Image.Image) -> dict[str, str]:
    chunks = {k: v for k, v in img.info.items() if isinstance(v, str)}
    if "studio" not in chunks and "parameters" not in chunks:
        # Text chunks after the pixel data only appear once the PNG is read fully.
        try:
            chunks.update(getattr(img, "text", {}) or {})
        except Exception:  # noqa: BLE001 - truncated tail: keep what the header had
            pass
    return chunks


def params_from_text(chunks: dict) -> dict:
    """Params from a PNG's text chunks: the "studio" JSON when it is a valid object, else the parsed
    "parameters" text, else ``{}``."""
    studio = chunks.get("studio")
    if studio is not None:
        try:
            data = json.loads(studio)
        except (json.JSONDecodeError, RecursionError):
            data = None  # corrupt or hostile JSON: fall back to the A1111 text
        if isinstance(data, dict):
            return data
    parameters = chunks.get("parameters")
    if parameters is not None:
        return parse_parameters(str(parameters))
    return {}
