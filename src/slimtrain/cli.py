"""Command line: ``slimtrain train | compare | plan | recipes | bench``.

Bad input ends with one ``slimtrain: error: ...`` line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

import slimtrain as st
from slimtrain.distributed import launch
from slimtrain.train.bench import BENCH_HEADER, VERSUS, configurations, format_row, run_bench, speedups
from slimtrain.train.compare import DEFAULT_COMPARE_RECIPES, compare
from slimtrain.train.models import GPT_SIZES
from slimtrain.train.plan import ARCHITECTURES, formula_check, plan_table, recipes_table
from slimtrain.train.recipes import RECIPES
from slimtrain.train.trainer import RESUMABLE_CHANGES, TrainConfig, format_summary, resume, train

# command-line option -> TrainConfig field, for options that configure a run
RUN_OPTIONS = ("recipe", "model", "data", "tokenizer", "steps", "batch_size", "seq_len", "lr", "warmup",
               "weight_decay", "clip", "eval_every", "eval_batches", "checkpoint_every", "seed", "compile",
               "sync_every", "low_rank", "omega", "lordo_options", "optim_options", "dist_timeout",
               "device")


def _number(kind: type, low: float, inclusive: bool = True) -> Any:
    """argparse type: a finite ``kind`` >= low (> low when not ``inclusive``)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value
    return parse


def _key_value(text: str) -> tuple[str, Any]:
    """argparse type: KEY=VALUE with VALUE an int, float, true/false or a word."""
    key, separator, value = text.partition("=")
    if not separator or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def _add_run_options(parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    """Options of one training run; every default is None so that a resume can tell what changed
    (TrainConfig holds the real defaults)."""
    defaults = TrainConfig()
    if recipe:
        parser.add_argument("--recipe", choices=list(RECIPES), metavar="NAME",
                            help=f"weights/updates/states recipe (default {defaults.recipe}; "
                                 f"see `slimtrain recipes`): {', '.join(RECIPES)}")
    parser.add_argument("--model", choices=list(GPT_SIZES), metavar="SIZE",
                        help=f"GPT size: {', '.join(GPT_SIZES)} (default {defaults.model})")
    parser.add_argument("--data", metavar="PATH",
                        help=f"text file or directory, or a built-in corpus: shakespeare, python-docs "
                             f"(default {defaults.data})")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="Hugging Face tokenizers JSON (default: bytes)")
    parser.add_argument("--steps", type=_number(int, 1), help=f"optimizer steps ({defaults.steps})")
    parser.add_argument("--batch-size", type=_number(int, 1),
                        help=f"sequences per step ({defaults.batch_size})")
    parser.add_argument("--seq-len", type=_number(int, 1),
                        help="tokens per sequence (default: the model's context)")
    parser.add_argument("--lr", type=_number(float, 0, False), help=f"peak learning rate ({defaults.lr})")
    parser.add_argument("--warmup", type=_number(int, 0), help=f"warm-up steps ({defaults.warmup})")
    parser.add_argument("--weight-decay", type=_number(float, 0), help=f"({defaults.weight_decay})")
    parser.add_argument("--clip", type=_number(float, 0),
                        help=f"max gradient norm, 0 = off ({defaults.clip})")
    parser.add_argument("--eval-every", type=_number(int, 1), help=f"steps between validations "
                                                                   f"({defaults.eval_every})")
    parser.add_argument("--eval-batches", type=_number(int, 1), help=f"({defaults.eval_batches})")
    parser.add_argument("--checkpoint-every", type=_number(int, 1), help=f"({defaults.checkpoint_every})")
    parser.add_argument("--seed", type=_number(int, 0), help=f"({defaults.seed})")
    parser.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                        help="eager optimizer steps (no fused C kernel or torch.compile)")
    parser.add_argument("--sync-every", type=_number(int, 1),
                        help="diloco/lordo: local steps per round (recipe default 16)")
    parser.add_argument("--low-rank", type=_number(int, 1),
                        help="lowrank-ddp/lordo: rank of the low-rank moments (recipe default 16)")
    parser.add_argument("--omega", type=_number(float, 0), help="lordo: weight of the low-rank direction")
    parser.add_argument("--lordo", dest="lordo_options", type=_key_value, action="append",
                        metavar="KEY=VALUE",
                        help="a LoRDO option, e.g. full_rank_scale=rms, moments_on_refresh=rotate, "
                             "svd=randomized, projection=local, error_feedback=false, outer_momentum=0.9")
    parser.add_argument("--optim", dest="optim_options", type=_key_value, action="append",
                        metavar="KEY=VALUE",
                        help="an AdamW option of the recipe, e.g. beta1=0.7, block_size=64, "
                             "state_maps=linear,log, state_rounding=stochastic,stochastic, "
                             "beta1_policy=fixed, quantile=0.05")
    parser.add_argument("--dist-timeout", type=_number(float, 0, False),
                        help=f"seconds to wait for other ranks before failing ({defaults.dist_timeout:g})")
    parser.add_argument("--device", choices=list(launch.DEVICES),
                        help="cpu, cuda (GPU LOCAL_RANK under torchrun) or auto: cuda where torch "
                             f"sees a GPU ({defaults.device})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {name: getattr(args, name) for name in RUN_OPTIONS if getattr(args, name, None) is not None}
    for name in ("lordo_options", "optim_options"):
        if name in overrides:
            overrides[name] = dict(overrides[name])
    return overrides


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line (with where to look), like the others."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimtrain", description=st.__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a GPT on a text corpus with a recipe")
    _add_run_options(p)
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<recipe>-<model>-<time>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its checkpoint "
                                                       "(--steps may extend it)")
    p.add_argument("--stop-after", type=_number(int, 1), metavar="STEP",
                   help="save a checkpoint and exit after this step (for time-limited jobs)")

    p = commands.add_parser("compare", help="train several recipes on the same data and seed")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), metavar="NAME",
                   help=f"recipes to run (default: {' '.join(DEFAULT_COMPARE_RECIPES)})")
    _add_run_options(p, recipe=False)
    p.add_argument("--nproc-per-node", type=_number(int, 1), default=1,
                   help="ranks per recipe, launched with torchrun (data-parallel recipes)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/compare-<time>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")

    p = commands.add_parser("plan", help="static memory of each recipe for a named architecture")
    p.add_argument("--model", required=True, type=_architecture, metavar="NAME",
                   help=f"architecture: {', '.join(ARCHITECTURES)} (the GPT sizes also by their "
                        "train names: tiny, small, ...)")

    commands.add_parser("recipes", help="list the recipes and their bytes per parameter")

    p = commands.add_parser("bench", help="optimizer step time and bandwidth against torch and peers")
    p.add_argument("--sizes", nargs="+", type=_size, default=[2**20, 16 * 2**20], metavar="N",
                   help="parameters per tensor, e.g. 1M 16M (default 1M 16M)")
    p.add_argument("--steps", type=_number(int, 1), default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=_number(int, 1), default=3, help="untimed steps first")
    p.add_argument("--only", nargs="+", metavar="TEXT",
                   help="configurations whose name contains TEXT (the fused baseline always runs)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--device", choices=list(launch.DEVICES), default="auto",
                   help="where the parameters and states live: cpu, cuda or auto (cuda where torch "
                        "sees a GPU; default)")
    p.add_argument("--versus", metavar="NAME",
                   help=f"also print how many times faster than configuration NAME each slimtrain "
                        f"configuration is; NAME is measured even where --only leaves it out "
                        f"(default: {VERSUS}, where installed and measured)")
    return parser


def _size(text: str) -> int:
    """argparse type: a count with an optional K or M suffix (powers of two), at least 1024."""
    scale = {"K": 2**10, "M": 2**20}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 65536, 64K or 16M") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1024 parameters")
    return value


def _architecture(name: str) -> str:
    """A name of ARCHITECTURES, the GPT sizes also as ``slimtrain train --model`` names them."""
    name = f"gpt-{name}" if f"gpt-{name}" in ARCHITECTURES else name
    if name not in ARCHITECTURES:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(ARCHITECTURES)})")
    return name


def _train(args: argparse.Namespace) -> int:
    overrides = _run_overrides(args)
    progress = not args.quiet
    if args.resume:
        unknown = set(overrides) - set(RESUMABLE_CHANGES)
        if unknown:
            def flags(names: Any) -> str:
                return ", ".join("--no-compile" if n == "compile" else "--" + n.replace("_", "-")
                                 for n in sorted(names))
            raise ValueError(f"--resume continues a run with its own settings; only "
                             f"{flags(set(RESUMABLE_CHANGES) - {'out'})} may be given (got {flags(unknown)})")
        if args.out or args.force:
            raise ValueError("--resume writes into RUN_DIR itself; drop --out/--force")
        result = resume(Path(args.resume), overrides, progress=progress, stop_after=args.stop_after)
    else:
        config = dataclasses.replace(TrainConfig(), **overrides, out=args.out)
        result = train(config, force=args.force, progress=progress, stop_after=args.stop_after)
    if result.summary:  # rank 0 reports; other ranks of a torchrun job stay quiet
        print(format_summary(result.summary, result.run_dir))
    return 130 if result.interrupted else 0


def _compare(args: argparse.Namespace) -> int:
    twice = sorted({name for name in args.recipes or [] if args.recipes.count(name) > 1})
    if twice:
        raise ValueError(f"--recipes names {', '.join(twice)} more than once")
    table = compare(args.recipes or list(DEFAULT_COMPARE_RECIPES), _run_overrides(args),
                    Path(args.out) if args.out else None, args.force, quiet=args.quiet,
                    nproc_per_node=args.nproc_per_node)
    print(table)
    return 0


def _plan(args: argparse.Namespace) -> int:
    print(plan_table(args.model))
    print()
    print("formula check against a measured model (GPT tiny, every recipe):")
    worst = 0.0
    for name, formula, measured in formula_check(GPT_SIZES["tiny"]):
        worst = max(worst, abs(formula - measured) / measured)
        print(f"  {name:<16} formula {formula:>10,} B   measured {measured:>10,} B")
    print(f"  largest relative difference: {worst:.2%}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch build sees no CUDA device; accepted here: cpu")
    if args.versus is not None and args.versus not in configurations():
        raise ValueError(f"--versus must name a configuration of this machine, one of "
                         f"{', '.join(configurations())}; got {args.versus!r}")
    for pattern in args.only or []:
        if not any(pattern in name for name in configurations()):
            print(f"slimtrain: note: --only {pattern!r} matches no configuration of this machine "
                  "(a peer that is not installed?)", file=sys.stderr)
    versus = args.versus or VERSUS
    device = launch.local_device(args.device).type
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(BENCH_HEADER)
    report = run_bench(args.sizes, args.steps, args.warmup, args.only,
                       progress=lambda row: print(format_row(row), flush=True), device=device,
                       also=(args.versus,) if args.versus else ())  # a named peer runs whatever --only says
    compiled = report["kernel_compile_seconds"]
    if device == "cpu":
        kernel_note = "; C kernels " + (
            f"compiled in {compiled:.1f} s (once per machine)" if compiled else "loaded from the cache")
    else:
        kernel_note = f"; Triton kernels {report['triton_kernels']}"
    for name, reason in report["failed_peers"].items():
        print(f"{name}: failed on this machine, left out ({reason})")
    report["speedups"] = dict(versus=versus, rows=speedups(report["results"], versus))
    if report["speedups"]["rows"]:
        print(f"x faster than {versus} (ratio of the two ratios to fused, same run):")
        for row in report["speedups"]["rows"]:
            print(f"{row['name']:<34}{row['numel']:>11,}{row['speedup']:>10.2f}")
    print(f"device {report['device']}; copy bandwidth {report['copy_bandwidth_gbs']:.1f} GB/s{kernel_note}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "bench":
            return _bench(args)
        print(recipes_table())
        return 0
    except BrokenPipeError:  # the reader stopped early (`slimtrain plan ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"slimtrain: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
