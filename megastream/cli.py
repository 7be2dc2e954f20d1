"""Command line.

    megastream train CONFIG [--set key=value ...] [--resume [PATH] | --overwrite] [--force]
    megastream demo                  train the bundled demo (CPU, 1-2 minutes)
    megastream prepare CONFIG        tokenize the data into its token cache now (train does it when missing)
    megastream plan CONFIG [--json]  memory budget, verdict for this machine, predicted speed
    megastream probe [--quick]       measure this machine's bandwidths and FLOP rate (cached for plan)
    megastream plot RUN_DIR          metrics.jsonl -> RUN_DIR/metrics.png
    megastream env                   versions, C++ ops, GPUs, RAM, locked-memory limit
"""

from __future__ import annotations

import argparse
import os
import sys

from megastream import __version__
from megastream.errors import ConfigError, Interrupted, MegastreamError
from megastream.tokenizer import DEMO_DIR

DEMO_CONFIG = DEMO_DIR / "demo.yaml"
EXAMPLES = """examples:
  megastream demo                                   train the bundled demo model (CPU, 1-2 minutes)
  megastream plan configs/qwen2.5-14b-24gb.yaml     does it fit this machine, and how fast will it run
  megastream train config.yaml --set train.lr=3e-5  train; --set overrides any config key
  megastream train config.yaml --resume             continue from the newest checkpoint in output.dir
  megastream <command> --help                       each command's options"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megastream", formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples as written
        description="Fine-tune a large language model on one GPU (or the CPU): weights and optimizer states\n"
                    "live in host RAM, and one layer at a time is streamed to the device.",
        epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"megastream {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=3e-5 (repeatable)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output.dir")
        sp.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the newest checkpoint in output.dir, or from PATH")
        sp.add_argument("--force", action="store_true",
                        help="start even when the memory plan says the run will not fit")

    t = sub.add_parser("train", help="train a model as a YAML config describes")
    t.add_argument("config", help="path to a YAML config (see configs/)")
    common(t)
    d = sub.add_parser("demo", help="train the built-in demo model on the bundled corpus (CPU, 1-2 min)")
    common(d)
    pp = sub.add_parser("prepare", help="tokenize the data once into its token cache and print its summary")
    pp.add_argument("config", help="path to a YAML config")
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    pp.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    pl = sub.add_parser("plan", help="print the memory budget, whether it fits this machine, and the predicted speed")
    pl.add_argument("config", help="path to a YAML config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    pl.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    pl.add_argument("--ranks-per-node", type=int, default=0, metavar="N",
                    help="plan a torchrun job of N processes (GPUs) per node: per-rank and per-node memory, "
                         "collective bytes and the step's terms")
    pl.add_argument("--nodes", type=int, default=1, metavar="M", help="with --ranks-per-node: M nodes (HSDP)")
    pl.add_argument("--peer-gbps", type=float, default=None, metavar="GB/S",
                    help="with --ranks-per-node: GPU-to-GPU bus bandwidth per GPU in a node (default 450, NVLink 4)")
    pl.add_argument("--net-gbps", type=float, default=None, metavar="GB/S",
                    help="with --nodes: network bandwidth per GPU between nodes (default 45, 400 Gb/s InfiniBand)")
    pr = sub.add_parser("probe", help="measure bandwidths, matmul and optimizer rates here; cache them for `plan`")
    pr.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    pr.add_argument("--quick", action="store_true",
                    help="small sizes: rough rates in seconds (a smoke test; plan is less accurate with them)")
    pt = sub.add_parser("plot", help="draw RUN_DIR/metrics.jsonl into a PNG")
    pt.add_argument("run_dir", help="a run's output.dir (holding metrics.jsonl)")
    pt.add_argument("-o", "--output", default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    sub.add_parser("env", help="versions, C++ ops, GPUs, RAM and the locked-memory limit")
    return p


def _probe(device: str, quick: bool = False) -> int:
    import torch

    from megastream.probe import run_probe, save_probe

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"megastream probe: measuring {device} ({'quick, rough rates' if quick else 'about a minute'})")
    sizes = {"optimizer_params": 2**20, "host_bytes": 2**26, "quick": True} if quick else {}
    rec = run_probe(torch.device(device), **sizes)
    if quick:
        rec["quick"] = True
    path = save_probe(rec)
    print(f"cached in {path}; `megastream plan` uses these numbers now")
    return 0


def _topology(args):
    """`plan --ranks-per-node N [--nodes M] [--peer-gbps X] [--net-gbps Y]`, or None."""
    if not args.ranks_per_node:
        if args.nodes != 1 or args.peer_gbps or args.net_gbps:
            raise ConfigError("plan: --nodes, --peer-gbps and --net-gbps describe a torchrun job; give its "
                              "--ranks-per-node N too (the processes, one per GPU, on each node)")
        return None
    from megastream.dist.cost import DEFAULT_NET_GBPS, DEFAULT_PEER_GBPS, Topology

    for flag, v in (("--ranks-per-node", args.ranks_per_node), ("--nodes", args.nodes),
                    ("--peer-gbps", args.peer_gbps or 1), ("--net-gbps", args.net_gbps or 1)):
        if v <= 0:
            raise ConfigError(f"plan: {flag} must be > 0, got {v}")
    return Topology(args.ranks_per_node, args.nodes, args.peer_gbps or DEFAULT_PEER_GBPS,
                    args.net_gbps or DEFAULT_NET_GBPS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "env":
            from megastream.env import print_env
            return print_env()
        if args.command == "probe":
            return _probe(args.device, args.quick)
        if args.command == "plot":
            from megastream.plot import plot_run
            print(f"wrote {plot_run(args.run_dir, args.output)}")
            return 0
        from megastream.config import load_config

        path = DEMO_CONFIG if args.command == "demo" else args.config
        cfg = load_config(path, args.set)
        if args.command == "plan":
            from megastream.plan import plan_main
            return plan_main(cfg, args.json, _topology(args))
        if args.command == "prepare":
            from megastream.data.loader import prepare_main
            return prepare_main(cfg, args.json)
        from megastream.train import train

        train(cfg, overwrite=args.overwrite, resume=args.resume, force=args.force)
    except Interrupted as e:
        print(f"megastream: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except MegastreamError as e:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        if rank == "0":
            print(f"megastream: error: {e}", file=sys.stderr)
        elif not isinstance(e, ConfigError):  # a config error is the same on every rank: rank 0 says it
            print(f"megastream [rank {rank}]: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("megastream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
