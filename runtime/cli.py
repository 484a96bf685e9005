"""The ``innfer`` command line.

innfer demo                 train the demo CNN, convert it to an INN, print accuracy by width
innfer inspect DIR          list a saved INN's continuous groups and sizes at a width
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _width(text: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"width must be a number in (0, 1], got {text!r}"
        ) from None
    if not 0 < w <= 1:
        raise argparse.ArgumentTypeError(f"width must be in (0, 1], got {text}")
    return w


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .conversion import convert
    from .evaluation import accuracy_by_width, format_table
    from .training import evaluate, train_model

    torch.set_num_threads(args.threads)
    print(f"training {args.model} (seed {args.seed}) ...")
    t0 = time.perf_counter()
    model, data = train_model(args.model, seed=args.seed, progress=True)
    full = evaluate(model, data.x_test, data.y_test)
    print(f"trained in {time.perf_counter() - t0:.1f} s: test accuracy {full:.2%}")
    t0 = time.perf_counter()
    inn = convert(model, (data.x_test[:2],), seed=args.seed, progress=True)
    print(f"converted in {time.perf_counter() - t0:.1f} s; continuous groups:")
    for g in inn.groups:
        print(f"  {g.name:<28} {g.size:>5} channels, {len(g.members)} tensors")
    out = inn.save(args.out)
    print(f"saved to {out}\n")
    print("test accuracy by width (no data, no fine-tuning):")
    rows = accuracy_by_width(inn, data, args.widths)
    print(format_table(rows, reference=full))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .model import load

    inn = load(args.directory)
    sizes = inn.sizes(args.width, args.multiple_of)
    print(f"{args.directory}: {len(inn.groups)} continuous groups")
    print(f"{'group':<30} {'full':>6} {'at ' + format(args.width, '.0%'):>8}")
    for g in inn.groups:
        print(f"{g.name:<30} {g.size:>6} {sizes[g.name]:>8}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="innfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the demo CNN, convert it, print accuracy by width")
    models = ["mnist_resnet", "digits_cnn", "digits_cnn_bn", "digits_mlp"]
    demo.add_argument("--model", default="mnist_resnet", choices=models)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("runs/demo/inn"))
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--widths", type=_width, nargs="+", default=[1.0, 0.75, 0.5, 0.4, 0.25])
    demo.set_defaults(func=cmd_demo)

    inspect = sub.add_parser("inspect", help="show a saved INN's groups")
    inspect.add_argument("directory", type=Path)
    inspect.add_argument("--width", type=_width, default=0.5)
    inspect.add_argument("--multiple-of", type=int, default=1)
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"innfer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
