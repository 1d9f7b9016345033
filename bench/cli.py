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
