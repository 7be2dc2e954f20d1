"""Command line: `megastream train CONFIG [--set key=value ...]`, `megastream demo`."""

from __future__ import annotations

import argparse
import sys

from megastream import __version__
from megastream.errors import Interrupted, MegastreamError
from megastream.tokenizer import DEMO_DIR

DEMO_CONFIG = DEMO_DIR / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megastream", description=__doc__)
    p.add_argument("--version", action="version", version=f"megastream {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=3e-5 (repeatable)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output.dir")
        sp.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest checkpoint in output.dir, or from PATH")

    t = sub.add_parser("train", help="train a model as a YAML config describes")
    t.add_argument("config", help="path to a YAML config (see configs/)")
    common(t)
    d = sub.add_parser("demo", help="train the built-in demo model on the bundled corpus (CPU, 1-2 min)")
    common(d)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from megastream.config import load_config
        from megastream.train import train

        path = DEMO_CONFIG if args.command == "demo" else args.config
        cfg = load_config(path, args.set)
        train(cfg, overwrite=args.overwrite, resume=args.resume)
    except Interrupted as e:
        print(f"megastream: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except MegastreamError as e:
        print(f"megastream: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("megastream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
