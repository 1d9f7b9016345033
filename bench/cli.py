"""Argument parsing shared by the benchmark commands (python -m bench, python -m bench.dram)."""
import argparse

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def comma_list(choices):
    """An argparse type: a comma list, each item one of `choices`."""
    def parse(s):
        items = [v for v in s.split(",") if v]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {', '.join(choices)}")
        return items
    return parse


def shape_arg(s):
    """An argparse type: N,C,H,W as a tuple of four positive ints (4-d: channels_last needs them)."""
    try:
        dims = tuple(int(v) for v in s.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: expected four positive sizes N,C,H,W (e.g. 32,64,56,56)")
    return dims
