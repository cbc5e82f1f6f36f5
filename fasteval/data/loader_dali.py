"""The DALI loader: decode, resize, crop and normalise, on the GPU (``mixed``) or the CPU.

The pipeline reproduces torchvision's geometry exactly: resize sizes are computed from each
image's header (shorter side to ``spec.resize``, longer side floored) and the crop offset
is torchvision's (half to even), passed as explicit positions. DALI's own
``resize_shorter`` and centre crop round differently (../shared/FACTS.md).
The reader gets the shared sample list, never its own directory scan; tar members (WebDataset) are fed
to the same decoder by an external source reading their bytes through fasteval/data/sources.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from fasteval.errors import FastevalError, message_lines
from fasteval.data.decoder_output import hold
from fasteval.data.batch import Batch
from fasteval.data.dali_settings import CPU_PREFETCH, DaliSettings
from fasteval.data.preprocess import PreprocessSpec
from fasteval.data.probe import find_undecodable
from fasteval.data.samples import SampleList
from fasteval.data.sources import read_bytes


# DALI's decoders log to stderr when one declines a file that another then decodes: nvImageCodec's
# coloured "[ERROR]" lines (libtiff on a CMYK TIFF, libjpeg-turbo on a truncated JPEG) and OpenCV's.
# nvImageCodec's ERROR level cannot be turned off (DALI_NVIMGCODEC_LOG_LEVEL is clamped to 1..5,
# and 1 keeps errors), so the files that trigger them go to PIL (fasteval.data.probe); these settings
# silence the rest (nvImageCodec's warnings, OpenCV's log). Set before DALI loads; values the
# user exported win.
QUIET_DECODER_LOGS = {"DALI_NVIMGCODEC_LOG_LEVEL": "1", "OPENCV_LOG_LEVEL": "OFF"}


def quiet_decoder_logs() -> None:
    """Keep DALI's decoders' own log lines off stderr, unless the user asked for them."""
    for name, value in QUIET_DECODER_LOGS.items():
        os.environ.setdefault(name, value)


def dali_available() -> bool:
    quiet_decoder_logs()
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _centre_crop_position(n, fn, types, dmath):
    """DALI crop_pos (0..1) that lands on torchvision's offset round(n / 2), half to even."""
    k = n // 2
    odd = n - 2 * k
    k_odd = k - 2 * (k // 2)
    offset = k + odd * k_odd
    return fn.cast(offset, dtype=types.FLOAT) / fn.cast(dmath.max(n, 1), dtype=types.FLOAT)


def build_pipeline(samples: SampleList, spec: PreprocessSpec, batch_size: int, settings: DaliSettings,
                   device: torch.device, raw: bool = False):
    """The DALI pipeline (not built yet), tuned by ``settings`` (the plan's: fasteval/data/dali_settings.py);
    outputs NHWC images in ``settings.output_dtype`` and int32 labels; ``raw``: NHWC uint8 images, resized and
    cropped but not normalised (fasteval/data/decoded.py keeps them)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=settings.threads, device_id=(device.index or 0) if gpu else None,
                  prefetch_queue_depth=settings.prefetch)
    def pipeline():
        if _on_disk(samples):
            encoded, labels = fn.readers.file(files=samples.paths, labels=samples.labels, pad_last_batch=True,
                                              random_shuffle=False, name="Reader")
        else:
            encoded, labels = fn.external_source(source=_member_source(samples, batch_size), num_outputs=2,
                                                 batch=False, dtype=[types.UINT8, types.INT32])
        shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)
        h, w = shape[0], shape[1]
        new_long = (spec.resize * dmath.max(h, w)) // dmath.min(h, w)
        portrait = fn.cast(w <= h, dtype=types.INT64)
        rw = portrait * spec.resize + (1 - portrait) * new_long
        rh = portrait * new_long + (1 - portrait) * spec.resize
        images = fn.decoders.image(encoded, **decoder_arguments(settings, gpu))
        images = fn.resize(images, resize_x=fn.cast(rw, dtype=types.FLOAT), resize_y=fn.cast(rh, dtype=types.FLOAT),
                           interp_type=types.INTERP_LINEAR, antialias=spec.antialias)
        norm = dict(mean=[m * 255 for m in spec.mean], std=[s * 255 for s in spec.std],
                    dtype=types.FLOAT16 if settings.output_dtype == "fp16" else types.FLOAT, output_layout="HWC")
        if raw:
            norm.update(mean=[0.0], std=[1.0], dtype=types.UINT8)
        if spec.crop is not None:
            c = spec.crop
            norm.update(crop=(c, c), crop_pos_x=_centre_crop_position(rw - c, fn, types, dmath),
                        crop_pos_y=_centre_crop_position(rh - c, fn, types, dmath))
        images = fn.crop_mirror_normalize(images, **norm)
        if gpu:
            labels = labels.gpu()
        return images, labels

    return pipeline()


def decoder_arguments(settings: DaliSettings, gpu: bool) -> dict:
    """``fn.decoders.image``'s keyword arguments: the GPU-only ones (hardware decoder share, buffer size hints)
    on the ``mixed`` decoder only; EXIF orientation ignored, as PIL's ``Image.open`` ignores it."""
    import nvidia.dali.types as types

    args = dict(device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False,
                jpeg_fancy_upsampling=settings.fancy_upsampling)
    if gpu and settings.hw_decoder_load is not None:
        args["hw_decoder_load"] = settings.hw_decoder_load
    if gpu and settings.size_hint is not None:
        args.update(preallocate_width_hint=settings.size_hint[0], preallocate_height_hint=settings.size_hint[1])
    return args


def _on_disk(samples: SampleList) -> bool:
    """Whether every sample is a file DALI's file reader can open (not a tar member)."""
    return samples.layout != "webdataset"


def _member_source(samples: SampleList, batch_size: int):
    """DALI's per-sample source for tar members: each sample's bytes (fasteval/data/sources.py, the offsets
    recorded once per shard) and its label, by its index in the pass; the last batch is filled with the last
    sample, as the file reader's ``pad_last_batch`` fills it. DALI's webdataset reader reads whole shards,
    where a run may evaluate a subset of them (the files that go by the reference's code, a torchrun rank's
    block); this reads exactly the list, in order, and DALI decodes it as it decodes files."""
    import numpy as np

    paths, labels = samples.paths, samples.labels
    whole = -(-len(paths) // batch_size) * batch_size

    def source(info):
        if info.idx_in_epoch >= whole:
            raise StopIteration
        index = min(info.idx_in_epoch, len(paths) - 1)
        return (np.frombuffer(read_bytes(paths[index]), dtype=np.uint8),
                np.array([labels[index]], dtype=np.int32))

    return source


class DaliStartError(FastevalError):
    """DALI's pipeline could not start, and no file among its first batches is undecodable: DALI's own
    failure (a GPU decoder it cannot create, a missing library), not the data's. ``--loader auto`` then
    decodes with torchvision's loader instead (fasteval/evaluation/fast.py)."""


class DaliLoader:
    """Batches of channels-last images on ``device``; the last batch is filled to the static size."""

    def __init__(self, samples: SampleList, spec: PreprocessSpec, batch_size: int, threads: int,
                 device: torch.device, half: bool = False, raw: bool = False,
                 settings: DaliSettings | None = None) -> None:
        """``settings``: the plan's tuning (fasteval/evaluation/plan.py); without one (a loader made outside a plan),
        ``threads`` threads, a prefetch of 2, fp16 output where ``half``, DALI's defaults for the GPU decoder."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.samples, self.batch_size = samples, batch_size
        self._mid_epoch = False
        self.name = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        self._pipe = None
        # DALI decodes from here on (the first batches while the model warms up) to the end of the first pass:
        # the C decoders' harmless warnings stay off stderr meanwhile (fasteval/data/decoder_output.py).
        self._quiet = hold()
        try:
            settings = settings or DaliSettings(max(1, threads), CPU_PREFETCH, "fp16" if half else "fp32")
            self.settings = settings
            self._pipe = build_pipeline(samples, spec, batch_size, settings, device, raw)
            self._pipe.build()
            # FILL + pad_last_batch: every sample once, in order; the last batch repeats its last
            # sample up to the static size, and those rows are marked ignored downstream.
            # Reset by hand when the next pass starts: DALI's auto_reset would start decoding the next pass
            # at once, beside whatever runs between passes (a bench's reference run, a training epoch).
            # Tar members come from an external source, which ends the pass itself (StopIteration).
            by_reader = dict(reader_name="Reader") if _on_disk(samples) else {}
            self._iter = DALIGenericIterator([self._pipe], ["images", "labels"], **by_reader,
                                             last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
            self._ended = False  # the epoch is over: reset() before the next pass
        except Exception as exc:
            # Starting the pipeline decodes the first batches (prefetch): a bad file there fails here.
            raise self._failure(exc, 0, f"cannot start the DALI pipeline on {device}", DaliStartError) from None

    def __iter__(self) -> Iterator[Batch]:
        seen = 0
        if not self._quiet.held:
            self._quiet = hold()
        try:
            if self._mid_epoch:  # an earlier pass stopped early: DALI cannot rewind, so finish that epoch
                for _ in self._iter:
                    pass
                self._ended = True
            if self._ended:
                self._iter.reset()
                self._ended = False
            self._mid_epoch = True
            for out in self._iter:
                images = out[0]["images"].permute(0, 3, 1, 2)  # NHWC memory: a channels-last NCHW view
                labels = out[0]["labels"].view(-1).long()
                real = min(self.batch_size, len(self.samples) - seen)
                seen += real
                yield Batch(images, labels, real)
            self._mid_epoch, self._ended = False, True
        except Exception as exc:
            raise self._failure(exc, seen, f"DALI failed after {seen} samples") from None
        finally:
            self._quiet.release()

    def _failure(self, exc: Exception, seen: int, what: str,
                 own: type[FastevalError] = FastevalError) -> FastevalError:
        """The error to raise: the undecodable file among the batches in flight (the pipeline
        prefetches ahead) named with the reference's reason, else DALI's own last line (as ``own``). The
        pipeline is stopped first, so that its decoders' last log lines come before this one."""
        if self._pipe is not None:
            getattr(self._pipe, "_shutdown", lambda: None)()
        self._quiet.release()
        path, reason = find_undecodable(self.samples.paths[seen:seen + 4 * self.batch_size])
        if path is not None:
            return FastevalError(f"cannot decode image {path}: {reason}")
        return own(f"{what}: {_dali_reason(exc)}")


def _dali_reason(exc: BaseException) -> str:
    """DALI wraps its errors in a pipeline trace: the line that says what failed is the last such line."""
    lines = message_lines(exc)
    failures = [line for line in lines if "fail" in line.lower() or "error" in line.lower()]
    return (failures or lines or [type(exc).__name__])[-1]
