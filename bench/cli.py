"""Argument parsing shared by the benchmark commands (python -m bench, python -m bench.dram)."""
import argparse


def comma_list(choices):
    """An argparse type: a comma list, each item one of `choices`."""
    def parse(s):
        items = [v for v in s.split(",") if v]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {', '.join(choices)}")
        return items
    return parse
