"""Files a client names. The studio opens a client's path only when it is a regular file inside Gradio's upload
folder (where Gradio stores this visitor's uploads and the outputs it served): any other path, including one sent
as a bare `{"path": ...}` dict that Gradio's image data model lets through, gets the same message whether it
exists or not. Sizes are checked on the file and its header before anything is decoded.

The Safe* components put the same checks in front of Gradio's own preprocessing (which decodes every editor
layer before a handler runs), and give the editors the EXIF orientation the browser showed.
"""
from __future__ import annotations

import os

import gradio as gr
import numpy as np
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.image_io import check_image_header
from pipelines.core.limits import get_limits

NOT_UPLOADED = "Please upload {what} again: the studio only opens images uploaded to it."
NO_URLS = "Please upload {what} as a file: images given by URL are not fetched."
# EXIF orientation -> the transpose that shows the picture upright (what the browser displays)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def upload_root() -> str:
    return os.path.realpath(get_upload_folder())


def _raw_path(value):
    if isinstance(value, FileData):
        return value.path
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", value)


def client_path(value, what: str = "the image") -> str:
    """The real path of a client-named file, if it is an upload (else InputError, the same for missing and
    forbidden files so nothing is learnt about the server's files). Checks bytes and the image header."""
    path = _raw_path(value)
    if value is None or path is None or path == "":
        if isinstance(value, dict) and value.get("url"):
            raise InputError(NO_URLS.format(what=what))
        raise InputError(f"Please upload {what}.")
    if not isinstance(path, str) or len(path) > 4096 or "\x00" in path:
        raise InputError(NOT_UPLOADED.format(what=what))
    real = os.path.realpath(path)
    root = upload_root()
    if os.path.commonpath([real, root]) != root or real == root or not os.path.isfile(real):
        raise InputError(NOT_UPLOADED.format(what=what))
    if os.path.getsize(real) > get_limits().max_upload_bytes:
        raise InputError(f"The file for {what} is too large (the limit is "
                         f"{get_limits().max_upload_bytes // 2**20} MB).")
    check_image_header(real)
    return real


def orientation(source) -> int:
    """The EXIF orientation tag of an image file or bytes (1 = upright, also when there is none)."""
    try:
        with Image.open(source if isinstance(source, str) else _bytes_io(source)) as im:
            return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a missing or odd tag means "as stored"
        return 1


def _bytes_io(data):
    import io

    return io.BytesIO(bytes(data))


def upright(array: np.ndarray, orient: int) -> np.ndarray:
    """An array decoded as stored, turned the way its EXIF orientation says it is shown."""
    method = _ORIENTATION.get(orient)
    if method is None or array is None:
        return array
    return np.asarray(Image.fromarray(np.asarray(array)).transpose(method))


def _refuse(exc: InputError):
    raise gr.Error(str(exc), print_exception=False) from None


class SafeImage(gr.Image):
    """gr.Image that refuses paths outside the upload folder and URLs, and checks the header before Gradio
    opens the file. The browser and clients see a plain Image."""

    def get_block_name(self) -> str:
        return "image"

    get_block_class = get_block_name

    def preprocess(self, payload):
        if payload is None:
            return None
        try:
            path = client_path(payload.model_dump() if hasattr(payload, "model_dump") else payload,
                               f"the image for '{self.label or 'Image'}'")
        except InputError as exc:
            _refuse(exc)
        payload.path = path
        return super().preprocess(payload)


class _SafeEditorMixin:
    """ImageEditor/ImageMask preprocessing behind the same checks; the background is turned upright."""

    def preprocess(self, payload):
        if payload is None:
            return None
        what = f"the image for '{self.label or 'Image'}'"
        files = [payload.background, payload.composite, *(payload.layers or [])]
        if payload.id is not None:
            _refuse(InputError(NOT_UPLOADED.format(what=what)))  # blob uploads are switched off below
        try:
            for f in files:
                if f is not None:
                    f.path = client_path(f, what)
        except InputError as exc:
            _refuse(exc)
        orient = orientation(payload.background.path) if payload.background is not None else 1
        value = super().preprocess(payload)
        if value is not None and orient != 1 and self.type == "numpy":
            value["background"] = upright(value.get("background"), orient)
        return value

    def accept_blobs(self, data):  # noqa: ARG002 - no longer a server function: refused with a 404
        raise gr.Error("Not available.", print_exception=False)


class SafeImageEditor(_SafeEditorMixin, gr.ImageEditor):
    def get_block_name(self) -> str:
        return "imageeditor"

    get_block_class = get_block_name


class SafeImageMask(_SafeEditorMixin, gr.ImageMask):
    def get_block_name(self) -> str:
        return "imageeditor"  # ImageMask is a template of the ImageEditor frontend

    get_block_class = get_block_name
