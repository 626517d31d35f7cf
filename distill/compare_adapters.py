"""Compare two exported GSPN adapters, e.g. of a 1-process and a 2-process run on the same data order.

    python -m gspn_diffusers.distill.compare_adapters RUN_A/gspn RUN_B/gspn --initial RUN_A/gspn-initial

Prints the largest absolute weight difference and the relative L2 difference of the weights; with
``--initial`` (the adapter before training, which benchmarks/bench_distill.py writes to
``output_dir/gspn-initial``) also the relative difference of what training changed,
||(a - init) - (b - init)|| / ||a - init||, the measure that says whether two runs trained alike.
``--tolerance T`` exits 1 when that measure (or, without --initial, the relative weight difference)
exceeds T.
"""

from __future__ import annotations

import argparse
import json
import sys


def _state(folder: str) -> dict:
    from gspn_diffusers.adapter import GSPNAdapter

    return {k: v.detach().double() for k, v in GSPNAdapter.from_pretrained(folder).state_dict().items()}


def compare(a: dict, b: dict, initial: dict | None = None) -> dict:
    if a.keys() != b.keys():
        raise ValueError(f"the adapters hold different weights: {sorted(a.keys() ^ b.keys())[:4]}")
    diff2 = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    result = dict(
        max_abs_difference=max((a[k] - b[k]).abs().max().item() for k in a),
        relative_l2=float(diff2.sqrt() / sum((a[k] ** 2).sum() for k in a).sqrt()),
    )
    if initial is not None:
        moved = sum(((a[k] - initial[k]) ** 2).sum() for k in a).sqrt()
        result["relative_l2_of_training_change"] = float(diff2.sqrt() / moved) if moved > 0 else float("inf")
        result["training_change_l2"] = float(moved)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--initial", default=None, help="the adapter both runs started from")
    parser.add_argument("--tolerance", type=float, default=None)
    args = parser.parse_args(argv)
    result = compare(_state(args.a), _state(args.b), _state(args.initial) if args.initial else None)
    print(json.dumps(result, indent=2))
    measure = result.get("relative_l2_of_training_change", result["relative_l2"])
    if args.tolerance is not None and measure > args.tolerance:
        print(f"DIFFERENT: {measure:.3g} > tolerance {args.tolerance}", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
