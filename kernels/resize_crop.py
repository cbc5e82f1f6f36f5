"""Fused resize + centre crop + normalize for a ragged batch of uint8 images, in one launch.

``resize_crop_normalize(images, size, crop, mean, std)`` takes decoded CHW uint8 images of any sizes (as
nvJPEG returns a batch) and writes one ``(N, 3, crop, crop)`` channels-last tensor in the model's input
dtype: each image resized with an antialiased filter (``Resize(size)``'s geometry: the shorter side to
``size``, the long side floored; or exactly ``(h, w)``), centre-cropped as ``CenterCrop`` offsets it, then
``(x / 255 - mean) / std``. Two implementations of one contract:

- ``resize_crop_triton``: a Triton kernel, one launch for the batch (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``). Only the crop's pixels are computed: each output pixel runs the horizontal
  pass on the source rows its vertical support needs, then the vertical pass, in registers.
- ``resize_crop_torch``: its plain-PyTorch twin, image by image (the fallback without Triton, and the
  kernel's executable spec). It needs no torchvision. On CUDA it copies each image's coefficients from
  pageable host memory (a host sync an image): a fallback for exactness, not for speed.

``resize_crop_pixels`` gives the same pixels as uint8, not normalised. The kernel is compiled per tap count
K (``variant_taps``: a power of two, the batch's widest support) and output shape; ``compile_variants``
compiles a run's variants before its batches, so that none compiles inside a timed loop.

How the filter is reproduced
----------------------------
torchvision's antialiased resize of a uint8 tensor on the CPU (``resize(img, ..., antialias=True)``) is
PIL's ImagingResample: separable, the horizontal pass then the vertical one, PIL's filters (bilinear =
the triangle of support 1, bicubic = the cubic with a = -0.5 and support 2), the support widened by the
scale when downscaling, each output's weights normalised to sum 1 over the part of its support inside
the image. Each pass multiplies uint8 pixels by fixed-point integer coefficients, adds half a unit,
shifts and clips to 0..255: the intermediate image is 8-bit. The coefficients are the float64 weights
rounded half away from zero to ``precision`` bits; PIL uses 22 bits, torchvision (torch's uint8 kernel)
the most bits, up to 22, for which the axis's largest coefficient fits an int16 (14 to 16 bits for
usual scales). Both implementations here compute the weights in float64 with the same formulas and
use torchvision's precision, with integer sums: their pixels are torchvision's, bit for bit. With PIL's
22 bits they would be PIL's, which differ from torchvision's by up to 2/255 (bicubic; 1/255 bilinear)
on random content: the issue's bound is against torchvision. (torchvision resizes uint8 tensors on CUDA
through float32, without the 8-bit intermediate: this kernel gives the CPU's pixels on a GPU too.)

Measured by tests/test_resize_crop.py, in pixel units (the normalised difference times std, times 255),
against torchvision's uint8 ``resize`` + ``center_crop``, then ``/ 255`` and ``normalize`` in float32:
both filters, 13 sizes from 1x1 to 2000x1500 (upscaling up to 256 times, odd sides, portrait, landscape,
square), random and hard-edged content, Resize(256) with centre crops, whole resized images and (h, w)
sizes: max error 0, mean 0, the kernel (under the interpreter) and the twin alike; the kernel equals the
twin bit for bit, also for float16 and bfloat16 outputs (each the float32 value rounded to nearest even).

The kernel computes every coefficient in float64 in registers (no tables in memory): per program the
precision (a scan of both axes' weights) and its columns' coefficients, per block of rows their
coefficients. Metadata (per image: its data pointer and strides, so the images are read where they lie,
any layout; sizes, resized sizes, crop offsets) is built on the host from the tensors' metadata, without
a torch operation per image, and reaches the device in one non-blocking copy from pinned memory: no host
sync. On a GPU the arithmetic is the twin's too: the kernel is compiled without fused multiply-adds
(``enable_fp_fusion=False``: each float64 weight operation rounds once, as torch's) and divides by
``tl.div_rn`` (Triton's float32 ``/`` is PTX's approximate div.full); tests/test_kernel_aot.py checks the
PTX. This module is self-contained (no fasteval imports).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False

# interpolation -> the filter's support (PIL's triangle and a = -0.5 cubic)
SUPPORTS = {"bilinear": 1.0, "bicubic": 2.0}
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "torch")
MAX_PRECISION = 22  # torch's search for the coefficient precision stops here (PIL's fixed precision)


def resized_hw(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's Resize output size: an int sets the shorter side (the long one floored), a pair is (h, w)."""
    if not isinstance(size, int):
        return size[0], size[1]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def crop_offsets(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """CenterCrop's (top, left) in an image of the given size (Python's round: half to even)."""
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def taps(in_size: int, out_size: int, interpolation: str) -> int:
    """The most source pixels one output pixel reads along an axis (PIL's ``ksize``)."""
    return math.ceil(SUPPORTS[interpolation] * max(in_size / out_size, 1.0)) * 2 + 1


def variant_taps(height: int, width: int, size: int | tuple[int, int], interpolation: str) -> int:
    """The kernel's tap count K for an image of this size: its widest support (``taps``) along either axis,
    rounded up to a power of two. A batch runs the compiled variant of its images' largest K: a run's
    variants are the K of its images (``compile_variants`` compiles them before its batches)."""
    rh, rw = resized_hw(height, width, size)
    return _next_pow2(max(taps(height, rh, interpolation), taps(width, rw, interpolation)))


def _check_args(images, size, crop, mean, std, interpolation, out_dtype, backend) -> None:
    """ValueError naming the argument that is wrong (one pass over the images' metadata)."""
    if interpolation not in SUPPORTS:
        raise ValueError(f"interpolation must be one of {sorted(SUPPORTS)}, got {interpolation!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    sides = list(size) if isinstance(size, (tuple, list)) and len(size) == 2 else [size]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
        raise ValueError(f"size must be a positive int or a (height, width) pair of them, got {size!r}")
    if crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or crop < 1):
        raise ValueError(f"crop must be a positive int or None, got {crop!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each (one per channel), got {len(mean)} and {len(std)}")
    if any(s == 0 for s in std):
        raise ValueError(f"std must not hold a zero, got {list(std)}")
    if len(images) == 0:
        raise ValueError("images is empty: give at least one image")
    device = getattr(images[0], "device", None)
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
            raise ValueError(f"images[{i}] must be a uint8 tensor, got {getattr(image, 'dtype', type(image))}")
        shape = image.shape
        if len(shape) != 3 or shape[0] != 3 or shape[1] < 1 or shape[2] < 1:
            raise ValueError(f"images[{i}] must be CHW with 3 channels, got shape {tuple(shape)}")
        if image.device != device:
            raise ValueError(f"images[{i}] is on {image.device} but images[0] on {device}: one device for the batch")


def geometry(images: Sequence[torch.Tensor], size: int | tuple[int, int], crop: int | None
             ) -> tuple[list[tuple[int, int, int, int, int, int]], tuple[int, int]]:
    """Per image (height, width, resized height, resized width, top, left), and the output (h, w).
    ValueError (naming crop) for a crop larger than a resized image, or ``crop=None`` with unequal resized
    sizes."""
    size = size if isinstance(size, int) else (size[0], size[1])
    rows = []
    for i, image in enumerate(images):
        _, h, w = image.shape
        rh, rw = resized_hw(h, w, size)
        if crop is None:
            if rows and (rh, rw) != rows[0][2:4]:
                raise ValueError(f"crop=None needs every image resized to one size: images[{i}] becomes "
                                 f"{rh}x{rw}, images[0] {rows[0][2]}x{rows[0][3]}")
            rows.append((h, w, rh, rw, 0, 0))
        elif crop > rh or crop > rw:
            raise ValueError(f"crop {crop} is larger than images[{i}] resized ({rh}x{rw})")
        else:
            rows.append((h, w, rh, rw, *crop_offsets(rh, rw, crop, crop)))
    return rows, (rows[0][2], rows[0][3]) if crop is None else (crop, crop)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resize_crop_normalize(images: Sequence[torch.Tensor], size: int | tuple[int, int], crop: int | None,
                          mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bilinear",
                          out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Resize (antialiased, torchvision's uint8 pixels), centre-crop and normalise a ragged batch of uint8
    CHW images into one (N, 3, crop, crop) channels-last tensor of ``out_dtype`` (see the module docstring).

    ``backend``: "triton" (the kernel, one launch), "torch" (the twin), "auto" (triton on CUDA when triton
    imports, else torch). ValueError names the argument that is wrong."""
    _check_args(images, size, crop, mean, std, interpolation, out_dtype, backend)
    device = images[0].device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    run = _triton if backend == "triton" else _torch
    return run(images, size, crop, mean, std, interpolation, out_dtype)


def resize_crop_pixels(images: Sequence[torch.Tensor], size: int | tuple[int, int], crop: int | None, *,
                       interpolation: str = "bilinear", backend: str = "auto") -> torch.Tensor:
    """The resized, centre-cropped uint8 pixels of a ragged batch, not normalised: (N, 3, h, w) channels-last,
    the pixels ``resize_crop_normalize`` normalises (what a store of decoded images keeps).

    The same launch with mean 0 and std 1/255: each float32 output is (p / 255) / (1 / 255) for the 8-bit
    pixel p, which is p to within a few float32 ulps (1.5e-5 at most over 0..255, IEEE division on every
    device), so rounding gives p exactly; the kernel compiled is the float32 one."""
    pixels = resize_crop_normalize(images, size, crop, (0.0, 0.0, 0.0), (1 / 255,) * 3, interpolation=interpolation,
                                   out_dtype=torch.float32, backend=backend)
    return pixels.round_().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# The twin


def _filter(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """torch's antialias filters, in float64 (the cubic's outer piece in torch's operation order)."""
    x = x.abs()
    if interpolation == "bilinear":
        return torch.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


def axis_coefficients(in_size: int, out_size: int, first: int, count: int, interpolation: str
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Resized indices ``first .. first+count-1`` along one axis: each one's first source index (int64),
    its fixed-point coefficients ([count, taps] int32, 0 past its support) and the axis's precision (bits),
    on the CPU. float64 weights from PIL's formulas; the precision is torchvision's: the most bits, up to 22,
    that keep the axis's largest weight (over all ``out_size`` outputs) within an int16."""
    scale = in_size / out_size
    support = SUPPORTS[interpolation] * (scale if scale >= 1.0 else 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    ksize = taps(in_size, out_size, interpolation)
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)
    start = (center - support + 0.5).trunc().clamp(min=0).long()
    count_all = (center + support + 0.5).trunc().clamp(max=in_size).long() - start
    j = torch.arange(ksize)
    w = _filter(((start[:, None] + j).double() - center[:, None] + 0.5) * invscale, interpolation)
    w = torch.where(j < count_all[:, None], w, 0.0)
    w = w / w.sum(dim=1, keepdim=True)
    largest = float(w.max())
    precision = next((p for p in range(MAX_PRECISION) if int(0.5 + largest * (1 << (p + 1))) >= 1 << 15),
                     MAX_PRECISION)
    scaled = w[first:first + count] * (1 << precision)
    kk = torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc().int()
    return start[first:first + count], kk, precision


def _pass(x: torch.Tensor, start: torch.Tensor, kk: torch.Tensor, precision: int, dim: int) -> torch.Tensor:
    """One 8-bit pass along ``dim`` of int32 pixels: the fixed-point sum, half a unit, shift, clip to 0..255."""
    shape = [1] * x.dim()
    shape[dim] = -1
    acc = torch.full((), 1 << (precision - 1), dtype=torch.int32, device=x.device)
    for k in range(kk.shape[1]):
        index = (start + k).clamp(max=x.shape[dim] - 1)  # past the support the coefficient is 0
        acc = acc + x.index_select(dim, index) * kk[:, k].view(shape)
    return (acc >> precision).clamp(0, 255)


def _resize_crop_one(image: torch.Tensor, geom: tuple[int, int, int, int, int, int], out_hw: tuple[int, int],
                     interpolation: str) -> torch.Tensor:
    """One image's crop, uint8 values as int32 [3, out_h, out_w]: the horizontal pass on the source rows the
    crop's vertical supports need, then the vertical pass."""
    h, w, rh, rw, top, left = geom
    ystart, kky, py = axis_coefficients(h, rh, top, out_hw[0], interpolation)
    xstart, kkx, px = axis_coefficients(w, rw, left, out_hw[1], interpolation)
    r0, r1 = int(ystart[0]), min(h, int(ystart[-1]) + kky.shape[1])
    dev = image.device
    rows = _pass(image[:, r0:r1].int(), xstart.to(dev), kkx.to(dev), px, dim=2)
    return _pass(rows, (ystart - r0).to(dev), kky.to(dev), py, dim=1)


def resize_crop_torch(images: Sequence[torch.Tensor], size: int | tuple[int, int], crop: int | None,
                      mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bilinear",
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The PyTorch twin, image by image on the images' device, pure torch (no torchvision, no
    ``F.interpolate``): PIL's two 8-bit passes with torchvision's coefficient precision, as integer
    gathers and sums (see the module docstring)."""
    _check_args(images, size, crop, mean, std, interpolation, out_dtype, "torch")
    return _torch(images, size, crop, mean, std, interpolation, out_dtype)


def _torch(images, size, crop, mean, std, interpolation, out_dtype) -> torch.Tensor:
    geoms, out_hw = geometry(images, size, crop)
    device = images[0].device
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(3, 1, 1)
    out = torch.empty((len(images), 3, *out_hw), dtype=out_dtype, device=device, memory_format=torch.channels_last)
    for i, (image, geom) in enumerate(zip(images, geoms)):
        pixels = _resize_crop_one(image, geom, out_hw, interpolation)
        out[i] = ((pixels.float() / 255.0 - m) / s).to(out_dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# The kernel

if HAS_TRITON:

    @triton.jit
    def _aa_filter(x, BICUBIC: tl.constexpr):
        """torch's antialias filters (float64), as in ``_filter``."""
        x = tl.abs(x)
        if BICUBIC:
            near = (1.5 * x - 2.5) * x * x + 1.0
            far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
            w = tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))
        else:
            w = tl.where(x < 1.0, 1.0 - x, 0.0)
        return w

    @triton.jit
    def _weights(o, in_size, out_size, k, SUPPORT: tl.constexpr, BICUBIC: tl.constexpr):
        """Resized indices ``o`` [L] along an axis: first source index [L] (int32), normalised float64
        weights [L, K] (0 past each support); ``k`` is arange(K). PIL's formulas, in float64."""
        scale = in_size.to(tl.float64) / out_size.to(tl.float64)
        down = scale >= 1.0
        support = tl.where(down, SUPPORT * scale, SUPPORT * 1.0)
        invscale = tl.where(down, 1.0 / scale, 1.0)
        center = scale * (o.to(tl.float64) + 0.5)
        start = tl.maximum((center - support + 0.5).to(tl.int32), 0)
        count = tl.minimum((center + support + 0.5).to(tl.int32), in_size.to(tl.int32)) - start
        arg = ((start[:, None] + k[None, :]).to(tl.float64) - center[:, None] + 0.5) * invscale
        w = tl.where(k[None, :] < count[:, None], _aa_filter(arg, BICUBIC), 0.0)
        return start, w / tl.sum(w, axis=1)[:, None]

    @triton.jit
    def _precision(in_size, out_size, k, SUPPORT: tl.constexpr, BICUBIC: tl.constexpr, SCAN: tl.constexpr):
        """torchvision's coefficient precision for an axis (int32 scalar): the first p < 22 where
        round(largest weight * 2^(p+1)) reaches 2^15, else 22. Scans all ``out_size`` outputs."""
        largest = tl.zeros([SCAN], tl.float64)
        for o0 in range(0, out_size, SCAN):
            o = tl.minimum(o0 + tl.arange(0, SCAN), out_size - 1)
            _, w = _weights(o, in_size, out_size, k, SUPPORT, BICUBIC)
            largest = tl.maximum(largest, tl.max(w, axis=1))
        top = tl.max(largest, axis=0)
        t = tl.arange(0, 32)
        q = (0.5 + top * (tl.full([32], 2, tl.int64) << t).to(tl.float64)).to(tl.int64)
        return tl.min(tl.where((q >= 32768) & (t < 22), t, 22), axis=0)  # 22: MAX_PRECISION

    @triton.jit
    def _fixed(w, p):
        """float64 weights -> int32 coefficients of ``p`` bits, rounded half away from zero."""
        scaled = w * (tl.full([], 1, tl.int32) << p).to(tl.float64)
        return tl.where(scaled < 0, scaled - 0.5, scaled + 0.5).to(tl.int32)

    @triton.jit
    def _round_to_bf16(x):
        """Finite float32 values rounded to the nearest bfloat16 (ties to even), still float32: the cast that
        follows is then exact. The GPU's cast rounds so too; the interpreter's truncates."""
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.add(bits, 0x7FFF + ((bits >> 16) & 1), sanitize_overflow=False)
        return (bits & -65536).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["batch"])
    def _resize_crop_kernel(
        meta_ptr, out_ptr, batch, out_h, out_w, tiles_x, groups, group_rows, so_n, so_c, so_h, so_w,
        SUPPORT: tl.constexpr, BICUBIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
        K: tl.constexpr, SCAN: tl.constexpr,
    ):
        """One program: BLOCK_X output columns of one image by a group of ``group_rows`` channel-rows (lane
        c * out_h + y: channel c, output row y, so the three channels share every instruction), in blocks of
        BLOCK_R. The precision scans and the columns' coefficients are computed once for the group."""
        pid = tl.program_id(0)
        n = pid // (tiles_x * groups)
        g = pid % (tiles_x * groups) // tiles_x
        ox = pid % tiles_x * BLOCK_X + tl.arange(0, BLOCK_X)
        meta = meta_ptr + n.to(tl.int64) * 10  # the host's table: 10 int64 an image, then mean and std
        image = tl.load(meta).to(tl.pointer_type(tl.uint8))
        height = tl.load(meta + 1)
        width = tl.load(meta + 2)
        stride_c = tl.load(meta + 3)
        stride_h = tl.load(meta + 4)
        stride_w = tl.load(meta + 5)
        rh = tl.load(meta + 6)
        rw = tl.load(meta + 7)
        top = tl.load(meta + 8)
        left = tl.load(meta + 9)
        norm = meta_ptr + batch.to(tl.int64) * 10
        k = tl.arange(0, K)
        col_ok = ox < out_w
        py = _precision(height, rh, k, SUPPORT, BICUBIC, SCAN)
        px = _precision(width, rw, k, SUPPORT, BICUBIC, SCAN)
        xstart, wx = _weights(left + tl.minimum(ox, out_w - 1), width, rw, k, SUPPORT, BICUBIC)
        kkx = _fixed(wx, px)[None, :, :]
        # Taps past a support have coefficient 0: clamped into the image, they load without a mask.
        xoff = (tl.minimum(xstart[:, None] + k[None, :], width - 1) * stride_w)[None, :, :]
        half_x = (tl.full([], 1, tl.int32) << px) >> 1
        half_y = (tl.full([], 1, tl.int32) << py) >> 1
        rows_end = tl.minimum((g + 1) * group_rows, 3 * out_h)
        for r0 in range(g * group_rows, rows_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            row_ok = r < rows_end
            r = tl.minimum(r, 3 * out_h - 1)  # lanes past the group: a valid row, masked at the store
            c = r // out_h
            oy = r % out_h
            ystart, wy = _weights(top + oy, height, rh, k, SUPPORT, BICUBIC)
            kky = _fixed(wy, py)
            ycount = tl.where(row_ok, tl.max(tl.where(wy != 0.0, k[None, :] + 1, 0), axis=1), 0)
            plane = image + c.to(tl.int64) * stride_c
            acc = tl.zeros([BLOCK_R, BLOCK_X], tl.int32)
            # Vertical tap t of each lane: the horizontal pass of that source row at the tile's columns
            # (8-bit: half a unit, shift, clip), weighted into the lane's sum. Inline: a device function
            # call costs the interpreter more than its arithmetic. The int32 sums cannot overflow
            # (|sum| <= 255 * 1.25 * 2^22, PIL's bound): the interpreter's overflow checks are off.
            for t in range(0, tl.max(ycount, axis=0)):
                wt = tl.sum(tl.where(k[None, :] == t, kky, 0), axis=1)
                row = plane + tl.minimum(ystart + t, height - 1) * stride_h
                taps = tl.load(row[:, None, None] + xoff).to(tl.int32)
                h = tl.add(tl.sum(tl.mul(taps, kkx, sanitize_overflow=False), axis=2), half_x,
                           sanitize_overflow=False)
                term = tl.mul(wt[:, None], tl.minimum(tl.maximum(h >> px, 0), 255), sanitize_overflow=False)
                acc = tl.add(acc, term, sanitize_overflow=False)
            pixel = tl.minimum(tl.maximum(tl.add(acc, half_y, sanitize_overflow=False) >> py, 0), 255)
            # (x / 255 - mean) / std, each step in float32 as torchvision's to_dtype and normalize round it.
            mean = tl.load(norm + c).to(tl.float64, bitcast=True).to(tl.float32)[:, None]
            std = tl.load(norm + 3 + c).to(tl.float64, bitcast=True).to(tl.float32)[:, None]
            value = tl.div_rn(tl.div_rn(pixel.to(tl.float32), 255.0) - mean, std)
            if out_ptr.dtype.element_ty == tl.bfloat16:
                value = _round_to_bf16(value)
            out = (out_ptr + n.to(tl.int64) * so_n + (c.to(tl.int64) * so_c + oy.to(tl.int64) * so_h)[:, None]
                   + ox.to(tl.int64)[None, :] * so_w)
            tl.store(out, value.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_blocks(out_h: int, out_w: int, k: int, longest: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_X, SCAN, GROUPS) for a ``k``-tap batch whose longest resized side is ``longest``.

    On a GPU: [BLOCK_R channel-rows, BLOCK_X columns, K taps] tiles of 2K source pixels (8 warps, 8 a
    thread: int64 addresses are the registers' main cost), the precision scan in [SCAN, K] float64 chunks
    of 1K (about 100 registers, no spills on sm_80/90/100: tests/kernel_aot.py), and about 16 programs an
    image (GROUPS of rows, times the column tiles), each paying the scans once; SCAN depends on K alone
    (a scan chunk past an axis's end is clamped), so the compiled variant is the run's output size and K,
    not the batch's longest side. Under the interpreter, whose cost is per operation more than per element:
    256K-pixel tiles, 8K-weight scan chunks no longer than the longest resized side, one group."""
    budget, scan, programs = ((1 << 18), (1 << 13), 1) if interpreted else ((1 << 11), (1 << 10), 16)
    block_x = min(_next_pow2(out_w), max(1, budget // k))
    block_r = min(_next_pow2(3 * out_h), max(1, budget // (block_x * k)))
    blocks_r = -(-3 * out_h // block_r)
    groups = min(blocks_r, max(1, programs // -(-out_w // block_x)))
    scan = max(1, scan // k)
    return block_r, block_x, min(_next_pow2(longest), scan) if interpreted else scan, groups


def _norm_bits(mean: Sequence[float], std: Sequence[float]) -> list[int]:
    """mean then std as float64 bit patterns (the metadata's last 6 int64s; the kernel rounds them to float32,
    as ``torch.tensor(mean, dtype=torch.float32)`` does)."""
    return list(struct.unpack("<6q", struct.pack("<6d", *mean, *std)))


def resize_crop_triton(images: Sequence[torch.Tensor], size: int | tuple[int, int], crop: int | None,
                       mean: Sequence[float], std: Sequence[float], *, interpolation: str = "bilinear",
                       out_dtype: torch.dtype = torch.float32, blocks: tuple[int, int, int, int] | None = None,
                       k: int | None = None) -> torch.Tensor:
    """The Triton kernel: one launch; the images stay where they are (the kernel reads them through a table
    of their data pointers and strides, built on the host from the tensors' metadata, with no per-image
    torch operation), the table reaches the device in one non-blocking copy from pinned memory.
    ``blocks`` overrides ``default_blocks`` (tests). ``k``: the variant's tap count K, a power of two at
    least the batch's own (``variant_taps``); None: the batch's own."""
    _check_args(images, size, crop, mean, std, interpolation, out_dtype, "triton")
    return _triton(images, size, crop, mean, std, interpolation, out_dtype, blocks, k)


def compile_variants(sizes: Sequence[tuple[int, int]], size: int | tuple[int, int], crop: int | None, *,
                     batch: int, device: torch.device, interpolation: str = "bilinear",
                     out_dtype: torch.dtype = torch.float32) -> list[int]:
    """Compile (or load from Triton's cache) the kernel variants that batches of ``batch`` images of these
    (height, width) ``sizes`` launch, before those batches: one launch per K (``variant_taps``), each on
    ``batch`` black images of the first size's resized shape (the run's output shape, for ``crop=None``
    too), which give every argument Triton specialises on the value a real batch gives it. The launches
    are queued, not waited for. Returns the K compiled, ascending."""
    ks = sorted({variant_taps(h, w, size, interpolation) for h, w in sizes})
    if ks:
        black = torch.zeros((3, *resized_hw(*sizes[0], size)), dtype=torch.uint8, device=device)
        for k in ks:
            resize_crop_triton([black] * batch, size, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                               interpolation=interpolation, out_dtype=out_dtype, k=k)
    return ks


def _triton(images, size, crop, mean, std, interpolation, out_dtype, blocks=None, k=None) -> torch.Tensor:
    device = images[0].device
    if not triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                         f"(images are on {device})")
    geoms, (out_h, out_w) = geometry(images, size, crop)
    need = longest = 1
    fields: list[int] = []
    for image, (h, w, rh, rw, top, left) in zip(images, geoms):
        fields += (image.data_ptr(), h, w, *image.stride(), rh, rw, top, left)
        need = max(need, taps(h, rh, interpolation), taps(w, rw, interpolation))
        longest = max(longest, rh, rw)
    need = _next_pow2(need)
    if k is not None and (k < need or k != _next_pow2(k)):
        raise ValueError(f"k must be a power of two of at least the batch's {need} taps, got {k}")
    k = k or need
    meta = torch.tensor(fields + _norm_bits(mean, std), dtype=torch.int64)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    out = torch.empty((len(images), 3, out_h, out_w), dtype=out_dtype, device=device,
                      memory_format=torch.channels_last)
    block_r, block_x, scan, groups = blocks or default_blocks(out_h, out_w, k, longest, device.type == "cpu")
    tiles_x = triton.cdiv(out_w, block_x)
    group_rows = triton.cdiv(triton.cdiv(3 * out_h, block_r), groups) * block_r
    groups = triton.cdiv(3 * out_h, group_rows)
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _resize_crop_kernel[(len(images) * tiles_x * groups,)](
            meta, out, len(images), out_h, out_w, tiles_x, groups, group_rows, *out.stride(),
            SUPPORT=SUPPORTS[interpolation], BICUBIC=interpolation == "bicubic", BLOCK_R=block_r,
            BLOCK_X=block_x, K=k, SCAN=scan, num_warps=8, enable_fp_fusion=False,
        )
    return out
