"""How the DALI pipeline is tuned: decoding threads, the hardware decoder's share, its buffers' size hints,
the prefetch depth, the output dtype and the chroma upsampling, chosen once by the plan with a reason each,
overridable with ``--dali KEY=VALUE,...``.

Torch-free (the option's parser runs before torch is imported). The values, and what they rest on:

- ``hw_decoder_load`` (``mixed`` only): the share of JPEGs sent to the GPU's hardware JPEG decoder (A100,
  H100 and later); the rest are decoded hybrid, Huffman on the decoding threads. DALI's docs say the best
  share "should be found empirically" and default to 0.65. 0.75 is the optimum NVIDIA's A100 article
  reports for an ImageNet pipeline (about 7,000 images/s at 75 %, 5,000 with the hardware alone, 6,000 with
  the GPU alone; as quoted in NVIDIA/DALI#5362). A training profile in NVIDIA/DALI#6366 gained 1.8 % from
  0.65 to 0.90 but doubled the decoder's worst batch (30.8 to 72.7 ms): the prefetch queue absorbs such
  batches here, and no GPU measurement of this pipeline exists yet, so 0.75 until one does.
- threads: on a GPU all usable cores but two (one feeds the GPU from Python, one is left for the rest of
  the process); on the CPU ``--workers`` (the model needs the cores there; measured in ../shared/FACTS.md).
- size hints (``mixed`` only): the 99th percentile of the JPEGs' widths and heights read from their
  headers, so that the hardware decoder allocates its buffers once; a larger image makes it grow them.
- prefetch depth: 3 on a GPU (a batch in the model, one ready, one decoding: a slow decoder batch does not
  stall the model), 2 on the CPU (the decoding threads share the cores with the model: a deeper queue
  only holds more memory).
- output dtype: DALI 2.4's ``crop_mirror_normalize`` writes FLOAT, FLOAT16, INT8 or UINT8, and DALI 2.4
  has no bfloat16 type at all. Under bf16 or fp16 on a GPU the pipeline writes fp16 (11 significant bits,
  more than bf16's 8; autocast casts it in the first layer; half the bytes of fp32); fp32 otherwise, and
  on the CPU (the measured CPU path).
- ``jpeg_fancy_upsampling``: the ``mixed`` decoder upsamples 4:2:0 chroma as libjpeg-turbo (PIL) does; on
  the CPU DALI's decoder gave PIL's pixels bit for bit with and without it (tests/test_dali_tuning.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

HW_DECODER_LOAD = 0.75
GPU_PREFETCH = 3
CPU_PREFETCH = 2
HINT_PERCENTILE = 99


@dataclass(frozen=True)
class DaliSettings:
    """The DALI pipeline's tuning, as ``loader_dali.build_pipeline`` passes it to DALI."""

    threads: int
    prefetch: int
    output_dtype: str = "fp32"  # "fp32" or "fp16": crop_mirror_normalize's output
    fancy_upsampling: bool = True
    hw_decoder_load: float | None = None  # mixed decoder only; None: DALI's default
    size_hint: tuple[int, int] | None = None  # (width, height), mixed decoder only; None: no hint

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class DaliOverrides:
    """What ``--dali`` sets; None keeps the plan's choice. ``size_hint`` (0, 0): no hint."""

    hw_decoder_load: float | None = None
    threads: int | None = None
    prefetch: int | None = None
    size_hint: tuple[int, int] | None = None

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def parse_overrides(text: str) -> DaliOverrides:
    """``--dali``'s value: ``KEY=VALUE`` pairs joined by commas (hw_decoder_load=0.9,threads=12,prefetch=4,
    size_hint=640x480 or none). Raises ValueError naming the offending pair."""
    keys = {f.name for f in fields(DaliOverrides)}
    values: dict[str, object] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or key not in keys:
            raise ValueError(f"expected KEY=VALUE with KEY one of {', '.join(sorted(keys))}, got {pair!r}")
        if key in values:
            raise ValueError(f"{key} given twice")
        values[key] = _parse_value(key, value)
    if not values:
        raise ValueError("expected KEY=VALUE pairs, got nothing")
    return DaliOverrides(**values)


def _parse_value(key: str, value: str):
    try:
        if key == "hw_decoder_load":
            number = float(value)
            if not 0.0 <= number <= 1.0:
                raise ValueError
            return number
        if key == "size_hint":
            if value.lower() == "none":
                return (0, 0)
            width, height = (int(v) for v in value.lower().split("x"))
            if width < 1 or height < 1:
                raise ValueError
            return (width, height)
        number = int(value)
        if number < 1:
            raise ValueError
        return number
    except ValueError:
        expected = {"hw_decoder_load": "a number from 0 to 1", "size_hint": "WIDTHxHEIGHT or none"}
        raise ValueError(f"{key}: expected {expected.get(key, 'an integer >= 1')}, got {value!r}") from None


def percentile(values: list[int], pct: int) -> int:
    """The nearest-rank ``pct``-th percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def choose_settings(gpu: bool, cores: int, workers: int, precision: str, jpeg_sizes: list[tuple[int, int]],
                    overrides: DaliOverrides = DaliOverrides(), ranks: int = 1) -> tuple[DaliSettings, str]:
    """The DALI pipeline's settings for a run on a GPU (``mixed`` decoding) or the CPU, and why (one clause a
    setting). ``cores``: the usable cores; ``ranks``: the torchrun processes sharing them (one a GPU);
    ``workers``: ``--workers``; ``precision``: the model's resolved precision; ``jpeg_sizes``: (width, height)
    of the JPEGs the fast pass decodes (their headers')."""
    o, why = overrides, []
    if gpu:
        share = cores // max(1, ranks)
        threads = o.threads or max(1, share - 2)
        cores_text = f"the {cores} usable cores" + (f" shared by {ranks} local ranks ({share} each)"
                                                    if ranks > 1 else "")
        why.append(f"{threads} decoding thread(s): " + ("--dali threads" if o.threads else
                   f"{cores_text} less two (one feeds the GPU, one for the rest)" if share > 2 else
                   f"at least one ({cores_text})"))
        load = HW_DECODER_LOAD if o.hw_decoder_load is None else o.hw_decoder_load
        why.append(f"hw_decoder_load {load:g}: " + ("--dali hw_decoder_load" if o.hw_decoder_load is not None else
                   "the share of JPEGs on the hardware decoder (A100, H100; the rest hybrid on the threads): "
                   "NVIDIA's A100 optimum (75 %: about 7,000 images/s against 5,000 on the hardware alone, "
                   "NVIDIA/DALI#5362) over DALI's default 0.65, to be swept on the GPU"))
        hint, hint_why = _size_hint(jpeg_sizes, o.size_hint)
        why.append(hint_why)
        prefetch = o.prefetch or GPU_PREFETCH
        why.append(f"prefetch {prefetch}: " + ("--dali prefetch" if o.prefetch else
                   "a batch in the model, one ready, one decoding (a slow decoder batch does not stall the model)"))
        dtype = "fp16" if precision in ("bf16", "fp16") else "fp32"
        why.append(f"output {dtype}: " + (
            "DALI 2.4's crop_mirror_normalize writes FLOAT, FLOAT16, INT8 or UINT8, no bfloat16; fp16 keeps "
            "11 significant bits (bf16 8), autocast casts it in the first layer, half fp32's bytes"
            if precision == "bf16" else "the model's input dtype"))
        why.append("chroma upsampled as libjpeg-turbo (PIL) does (jpeg_fancy_upsampling)")
        return DaliSettings(threads, prefetch, dtype, True, load, hint), "; ".join(why)
    threads = o.threads or max(1, workers)
    why.append(f"{threads} decoding thread(s): " + ("--dali threads" if o.threads else
               "--workers (the model needs the cores on the CPU)"))
    prefetch = o.prefetch or CPU_PREFETCH
    why.append(f"prefetch {prefetch}: " + ("--dali prefetch" if o.prefetch else
               "the threads share the cores with the model: a deeper queue only holds more memory"))
    why.append("output fp32 (the measured CPU path; autocast casts in the first layer)")
    why.append("chroma as PIL's (the CPU decoder's pixels are PIL's, jpeg_fancy_upsampling on or off)")
    ignored = [name for name in ("hw_decoder_load", "size_hint") if getattr(o, name) is not None]
    if ignored:
        why.append(f"--dali {' and '.join(ignored)}: the GPU decoder's only, not used on the CPU")
    return DaliSettings(threads, prefetch, "fp32", True), "; ".join(why)


def _size_hint(jpeg_sizes: list[tuple[int, int]], given: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str]:
    if given == (0, 0):
        return None, "no size hints: --dali size_hint none"
    if given is not None:
        return given, f"size hints {given[0]}x{given[1]}: --dali size_hint"
    if not jpeg_sizes:
        return None, "no size hints: no JPEG for the hardware decoder"
    hint = (percentile([w for w, _ in jpeg_sizes], HINT_PERCENTILE), percentile([h for _, h in jpeg_sizes],
                                                                                 HINT_PERCENTILE))
    return hint, (f"size hints {hint[0]}x{hint[1]}: the {HINT_PERCENTILE}th percentile of the {len(jpeg_sizes)} "
                  f"JPEGs' widths and heights (the hardware decoder allocates once; larger ones grow its buffers)")
