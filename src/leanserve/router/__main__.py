"""`python -m leanserve.router ...`, the same as `leanserve router ...`."""

import argparse
import sys

from leanserve.router.cli import add_router_arguments, run_router


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leanserve.router", description=__doc__)
    add_router_arguments(parser)
    return run_router(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
