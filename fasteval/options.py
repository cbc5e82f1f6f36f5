"""The options ``eval``, ``bench`` and ``train`` share: argparse types, the run and fast-path option
groups, and what the parsed options mean to the commands (the fast path's options, the output paths)."""

from __future__ import annotations

import argparse
import sys

from fasteval.choices import CPU_BATCH_PIXELS_PER_CORE
from fasteval.procs import usable_cores


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def dali_overrides(text: str):
    """An argparse type: ``--dali``'s KEY=VALUE pairs (fasteval/data/dali_settings.py)."""
    from fasteval.data.dali_settings import parse_overrides

    try:
        return parse_overrides(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_empty_path(text: str) -> str:
    """An argparse type: a non-empty path (an empty one would resolve to the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def add_run_options(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """``eval``'s and ``bench``'s DATA, model, preprocessing and run options (``sweep``: eval's ``--weights``
    takes several checkpoints)."""
    p.add_argument("data", nargs="?", metavar="DATA", type=non_empty_path,
                   help="an ImageFolder root (ROOT/CLASS/IMAGE), a CSV list (path,label) or WebDataset tar shards "
                        "(a .tar, \"val-{000..009}.tar\" or a folder of them); omitted: the built-in demo dataset "
                        "and model")
    p.add_argument("--arch", help="torchvision classification model name, or timm:NAME for a timm model (default: the "
                                  "architecture a fasteval train checkpoint records, else resnet18)")
    p.add_argument("--weights", type=non_empty_path,
                   help="checkpoint file (torch.save'd state_dict or a dict holding one, or safetensors), or "
                        "DEFAULT for the pretrained weights "
                        "(torchvision's, or timm's for timm:NAME); omitted: random init (demo: its fitted model)"
                        + ("; several files (--weights A B, or --weights A --weights B), a folder of *.pt/*.pth or a "
                           "glob: a sweep, decoded and compiled once, ranked with paired statistics" if sweep else ""),
                   nargs="+" if sweep else None, action="extend" if sweep else OnceAction)
    p.add_argument("--classes", metavar="N|FILE", type=non_empty_path,
                   help="the model's classes where DATA holds only some of them: N (WebDataset shards, whose .cls are "
                        "the head's indices) or a file of class names, one per line in the head's order (a folder's "
                        "or CSV's classes are found there by name); default: DATA's own classes")
    p.add_argument("--preset", help="preprocessing preset: imagenet or seed (default: what a fasteval train checkpoint "
                                    "records, a timm model's own configuration, else imagenet)")
    p.add_argument("--resize", type=positive_int, help="override the preset's shorter-side resize")
    p.add_argument("--crop", type=positive_int, help="override the preset's center crop")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="the reference's batch size and the fast path's largest (default 64); the fast path makes "
                        f"its batches as equal as they can be, on the CPU at most {CPU_BATCH_PIXELS_PER_CORE // 224**2} "
                        "images of 224x224 per core")
    p.add_argument("--workers", type=non_negative_int, default=min(8, usable_cores()),
                   help="decoding workers/threads (default: min(8, cores))")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", metavar="PATH", type=non_empty_path,
                   help="write every figure, the configuration and the environment")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


class OnceAction(argparse.Action):
    """An option that takes one value, refused when given twice (argparse would keep the last silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): give it once")
        setattr(namespace, self.dest, values)


class CompileAction(argparse.Action):
    """``--compile MODE`` and ``--no-compile`` set one value: given both with different values (``--compile
    on --no-compile``, either order) they are refused, where argparse would let the last one win silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        given = f"{option_string}{'' if self.nargs == 0 else ' ' + value}"
        action, earlier, earlier_value = getattr(namespace, "_compile_given", (self, "", value))
        if action is not self and earlier_value != value:
            parser.error(f"{earlier} and {given} contradict each other: choose one")
        setattr(namespace, "_compile_given", (self, given, value))
        setattr(namespace, self.dest, value)


def add_fast_options(p: argparse.ArgumentParser, dali: bool = True) -> None:
    """The fast path's options, shared by ``eval``, ``bench`` and ``train`` (its validation evaluator). ``dali``:
    whether ``--dali`` is taken (eval only: bench's timed commands and train's validation do not pass it on)."""
    p.add_argument("--loader", default="auto",
                   help="auto (default: DALI where installed, else torchvision's loaders; a CPU run of at most 512 "
                        "images reads PIL's pixels, decoded at start-up), dali or torchvision")
    if dali:
        p.add_argument("--dali", type=dali_overrides, metavar="KEY=VALUE,...",
                       help="tune the DALI pipeline over the plan's choices (--explain shows them): "
                            "hw_decoder_load=0..1 (the GPU's hardware JPEG decoder's share), threads=N (decoding "
                            "threads), prefetch=N (batches decoded ahead), size_hint=WxH or none (the hardware "
                            "decoder's buffers)")
    p.add_argument("--precision", default="auto", help="auto (bf16 where fast, else fp32), fp32, bf16 or fp16")
    p.add_argument("--compile", default="auto", action=CompileAction,
                   help="auto (default: torch.compile where the model time it saves exceeds the compile's cost, "
                        "given the compile cache's state; auto also lets a run too small for the fast path to "
                        "pay go by the reference's code: --explain shows the route), on, or off (eager: "
                        "channels-last + autocast); on and off always take the fast path")
    p.add_argument("--no-compile", dest="compile", action=CompileAction, nargs=0, const="off",
                   help="same as --compile off")
    p.add_argument("--exact", default="auto",
                   help="auto (default; the same as on, as the fast path's arithmetic always differs from the "
                        "reference's) or on: recheck near-tie samples with the reference's own code, so the "
                        "top-1/top-5 counts are the reference's; off: keep the fast path's values")


def warn_many_workers(workers: int) -> None:
    """More workers than cores only adds memory and start-up time: one line of ours, in place of
    torch's DataLoader warning (several lines with a source path, once per loader)."""
    import warnings

    cores = usable_cores()
    if workers > cores:
        print(f"fasteval: warning: --workers {workers} is more than the {cores} cores this process may use: each "
              f"worker is a process (PIL) or a thread (DALI), and more than the cores only add memory and start-up "
              f"time", file=sys.stderr)
        warnings.filterwarnings("ignore", message="This DataLoader will create")


def output_paths(args) -> dict[str, str | None]:
    """Every path ``eval`` (a sweep's too) or ``bench`` writes, by option (None where not given)."""
    return {option: getattr(args, option[2:], None) for option in ("--json", "--predictions", "--plot", "--cache")}


def fast_options(args):
    """The parsed fast-path options as the evaluator's ``FastOptions``."""
    from fasteval.evaluation.fast import FastOptions

    # --validate compares the fast path with the plain loop: it must run the fast path, whatever the route says.
    return FastOptions(loader=args.loader, precision=args.precision, compile=args.compile,
                       batch_size=args.batch_size, workers=args.workers, exact=args.exact,
                       route=not getattr(args, "validate", False),
                       **({"dali": args.dali} if getattr(args, "dali", None) else {}))
