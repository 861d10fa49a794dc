"""KV caches as ZeroMQ frames: a msgpack-able header plus one raw buffer per tensor.

The daemon answers ``kv_get`` with a header (in the normal msgpack reply) and
``2 * num_layers`` extra frames: keys and values of layer 0, then layer 1...
Each frame is the raw C-contiguous bytes of a ``[kv_heads, T, head_dim]``
tensor in the header's dtype, native byte order (the daemon and its clients
share a host: IPC only).

Header::

    {"format": "memosd-kv-frames/1", "fingerprint": hex, "dtype": "float32",
     "token_ids": <bytes, uint32 LE>, "item_id": str | None, "version": int | None,
     "layers": [[kv_heads, head_dim], ...]}

Zero copy: :func:`cache_to_frames` returns memoryviews over the tensors'
memory (send them with ``copy=False``); :func:`frames_to_cache` wraps the
received buffers with ``torch.frombuffer`` without copying.  The one copy
happens when the :class:`LoadedCache` hands out a ``DynamicCache``
(copy-on-read), which a model needs anyway since generation appends to it.
Everything in the header is checked against the frames (count, sizes) before
any tensor is built: a hostile or truncated reply raises :class:`CodecError`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, Final

import torch

from memosd.errors import CodecError
from memosd.kv.cache import LoadedCache
from memosd.kv.codec import pack_token_ids, unpack_token_ids

__all__ = ["FRAMES_FORMAT", "cache_to_frames", "frames_to_cache"]

FRAMES_FORMAT: Final = "memosd-kv-frames/1"
_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_MAX_LAYERS: Final = 4096
_MAX_DIM: Final = 1 << 16


def _as_buffer(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # A byte view works for every dtype (numpy has no bfloat16); it keeps t alive.
    array: Any = t.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def cache_to_frames(loaded: LoadedCache) -> tuple[dict[str, Any], list[memoryview]]:
    """The header and the tensor buffers of ``loaded`` (see the module docstring)."""
    layers = []
    frames: list[memoryview] = []
    for k, v in loaded.layers:
        layers.append([int(k.shape[1]), int(k.shape[3])])
        frames.append(_as_buffer(k[0]))
        frames.append(_as_buffer(v[0]))
    header = {
        "format": FRAMES_FORMAT,
        "fingerprint": loaded.fingerprint,
        "dtype": loaded.dtype,
        "token_ids": pack_token_ids(loaded.token_ids),
        "item_id": loaded.item_id,
        "version": loaded.version,
        "layers": layers,
        "byteorder": sys.byteorder,
    }
    return header, frames


def frames_to_cache(header: dict[str, Any], frames: Sequence[Any]) -> LoadedCache:
    """Rebuild a :class:`LoadedCache` from a header and buffers (bytes, memoryview, zmq.Frame)."""
    try:
        if header.get("format") != FRAMES_FORMAT:
            raise CodecError(f"unknown KV frames format {header.get('format')!r}")
        if header.get("byteorder", sys.byteorder) != sys.byteorder:
            raise CodecError("KV frames were sent with another byte order")
        dtype_name = str(header["dtype"])
        if dtype_name not in _DTYPES:
            raise CodecError(f"unknown KV dtype {dtype_name!r}")
        dtype = _DTYPES[dtype_name]
        token_ids = unpack_token_ids(bytes(header["token_ids"]))
        shapes = [(int(h), int(d)) for h, d in header["layers"]]
        fingerprint = str(header["fingerprint"])
        item_id = header.get("item_id")
        version = header.get("version")
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"malformed KV frames header: {exc!r}") from None
    if not 0 < len(shapes) <= _MAX_LAYERS or len(frames) != 2 * len(shapes):
        raise CodecError(f"expected {2 * len(shapes)} KV frames, got {len(frames)}")
    n = len(token_ids)
    item_size = torch.empty((), dtype=dtype).element_size()
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, (heads, head_dim) in enumerate(shapes):
        if not (0 < heads <= _MAX_DIM and 0 < head_dim <= _MAX_DIM):
            raise CodecError(f"KV layer {index} has an impossible shape")
        pair = []
        for frame in frames[2 * index : 2 * index + 2]:
            buffer = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
            view = memoryview(buffer)
            if view.nbytes != heads * n * head_dim * item_size:
                raise CodecError(f"KV frame of layer {index} has {view.nbytes} bytes")
            with warnings.catch_warnings():
                # Receive buffers are read-only; these tensors are never written
                # (copy-on-read), so torch's warning about it does not apply.
                warnings.simplefilter("ignore", UserWarning)
                flat = (
                    torch.frombuffer(view, dtype=dtype)
                    if view.nbytes
                    else torch.empty(0, dtype=dtype)
                )
            pair.append(flat.view(1, heads, n, head_dim))
        layers.append((pair[0], pair[1]))
    return LoadedCache(
        layers=tuple(layers),
        token_ids=token_ids,
        fingerprint=fingerprint,
        dtype=dtype_name,
        item_id=str(item_id) if item_id is not None else None,
        version=int(version) if version is not None else None,
    )
