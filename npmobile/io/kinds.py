"""Naming a file that is not a Keras file for what it is, so the message says "a PyTorch checkpoint", not
"a .keras archive with no config.json". Only the first bytes and a zip's member names are looked at."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable

from npmobile.errors import ModelFileError

# The first bytes of the two containers Keras writes (and PyTorch's zip format shares the zip one).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"

KERAS_MEMBERS = ("config.json", "model.weights.h5")
NOT_SUPPORTED = "npmobile reads Keras files (.h5, .keras, .weights.h5)"


def foreign_file(path: str, head: bytes) -> str:
    """The message for a file that is neither HDF5 nor zip, from its first bytes."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # Not torch.save's (its zip and its legacy pickle are recognised before this): pickle.dump's own.
        return (f"{path}: a Python pickle written by pickle.dump, not a PyTorch file: npmobile reads state dicts "
                "saved with torch.save(model.state_dict(), PATH) (.pth, .safetensors) and Keras files (.h5, "
                ".keras, .weights.h5); a plain pickle is never opened, unpickling can run code")
    if head[4:8] == b"TFL3":
        kind = "a TensorFlow Lite model"
    elif head.startswith(b"\x93NUMPY"):
        kind = "a NumPy .npy array"
    elif len(head) >= 10 and head[8:10] == b'{"':
        kind = "a safetensors file"
    elif head[:1] == b"\x08" and path.lower().endswith(".onnx"):
        kind = "an ONNX model"
    else:
        return f"{path}: not a Keras file (neither HDF5 .h5 nor a .keras zip)"
    return f"{path}: {kind}, not a Keras file: {NOT_SUPPORTED}"


def foreign_archive(path: str, members: Iterable[str]) -> str | None:
    """The message for a zip that is not a .keras archive (None if it looks like one)."""
    names = list(members)
    if any(name in KERAS_MEMBERS for name in names):
        return None
    tails = {name.rsplit("/", 1)[-1] for name in names}
    if "data.pkl" in tails:
        kind = "a PyTorch checkpoint (a torch.save zip holding data.pkl; a torchvision MobileNet's state dict loads " \
               "with npmobile.load_model)"
    elif names and all(name.endswith(".npy") for name in names):
        kind = "a NumPy .npz archive"
    elif any(name.endswith("saved_model.pb") for name in names):
        kind = "a zipped TensorFlow SavedModel"
    else:
        kind = "a zip archive without a .keras model's config.json or model.weights.h5"
    return f"{path}: {kind}, not a Keras file: {NOT_SUPPORTED}"



def zip_members(path: str, infos: Iterable[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """A zip's members by name; a name that occurs twice is refused (which of the two a reader takes differs:
    Python's zipfile the last, others the first, so the file would mean two things)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in members:
            raise ModelFileError(f"{path}: the archive holds two members named {info.filename!r}; refusing it")
        members[info.filename] = info
    return members
