"""Every `megastream ...` command shown in README.md runs and exits as the README says, so the README
cannot drift from the program.

The commands are parsed out of README.md's fenced code blocks (the part after `&&` in a
`pip install ... && megastream demo` line counts). Each must have an entry in COMMANDS: its exit code
on a machine without a usable GPU (CUDA is hidden from the commands, so a GPU machine gives the same
answers, except `plan`, which reads the GPU through NVML: it must exit 0 exactly when its verdict is
"fits") and the arguments the test adds to keep it short. A command that README
gains without an entry here fails the test, and so does an entry whose command README no longer
shows. All commands run in one temporary directory, in README order (as a reader would run them),
with HOME and MEGASTREAM_CACHE there too, so nothing in the repository or in the user's cache is
written. Inline `megastream ...` spans in the prose are checked against the CLI's parser.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO

README = REPO / "README.md"
LIMIT_S = 60  # each command (see _run)
# Added to the training commands: a few steps of 2 x 128 tokens (the commands' own settings, the
# notes and the outputs are what is tested; `tests/test_demo.py` tests the demo's learning).
SHORT = ("--set", "train.steps=4", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=1")


@dataclass(frozen=True)
class Case:
    rc: int  # exit code on a machine without a usable GPU
    add: tuple[str, ...] = ()  # appended to cut the command short
    says: tuple[str, ...] = ()  # in its stdout + stderr
    writes: tuple[str, ...] = ()  # files it must leave, relative to the working directory
    leaves_no: tuple[str, ...] = ()  # paths it must not create
    setup: str | None = None  # name of a function below, run before it
    plan_verdict: bool = False  # a `plan`: exit 0 when its verdict is "fits", else 1 (always 1 with no GPU)


def _a_run_dir(cwd: Path, env: dict) -> None:
    """runs/qwen2.5-14b holding a real run's metrics (the 14B run itself needs a GPU machine): the
    demo's, when the README's `megastream demo` has already run here, else a 3-step demo run."""
    target = cwd / "runs" / "qwen2.5-14b"
    demo_metrics = cwd / "runs" / "demo" / "metrics.jsonl"
    if demo_metrics.is_file():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_metrics, target / "metrics.jsonl")
    else:
        _run(["megastream", "demo", *SHORT, "--set", "output.dir=runs/qwen2.5-14b"], cwd, env, check=True)


COMMANDS: dict[str, Case] = {
    "megastream demo": Case(0, SHORT, says=("megastream: done",),
                            writes=("runs/demo/final/config.json", "runs/demo/metrics.jsonl")),
    "megastream train configs/demo.yaml --set train.lr=3e-5 --set train.steps=10 --set output.dir=runs/short":
        Case(0, SHORT[2:], says=("megastream: done", "train.min_lr 0.0003 (from demo.yaml) follows train.lr",
                      "train.warmup_steps 20 (from demo.yaml) capped at train.steps=10"),
             writes=("runs/short/final/model.safetensors",)),
    "megastream prepare configs/demo.yaml": Case(0, says=("megastream prepare: train data", "pack bfd", "fill"),
                                                 writes=("runs/.megastream-cache/*/header.json",)),
    "megastream prepare configs/demo.yaml --json": Case(0, says=('"fill":', '"packed_rows":')),
    "megastream plan configs/qwen2.5-14b-24gb.yaml": Case(1, says=("verdict:",), plan_verdict=True),
    "megastream plan configs/qwen2.5-14b-24gb.yaml --json": Case(1, says=('"fits":',), plan_verdict=True),
    "megastream plan configs/qwen2.5-14b-24gb.yaml --ranks-per-node 2 --nodes 2":
        Case(1, says=("data parallel: 4 ranks = 2 per node x 2 node(s)", "all-gather", "scaling efficiency"),
             plan_verdict=True),
    "megastream probe": Case(0, ("--quick",), says=("cached in",), writes=("cache/probe.json",)),
    # A CPU machine: refused up front with the reason, nothing written.
    "megastream train configs/qwen2.5-14b-24gb.yaml": Case(2, says=("megastream: error: engine.device: 'cuda'",),
                                                           leaves_no=("runs/qwen2.5-14b",)),
    "megastream plot runs/qwen2.5-14b": Case(0, says=("wrote",), writes=("runs/qwen2.5-14b/metrics.png",),
                                             setup="_a_run_dir"),
    "megastream env": Case(0, says=("megastream ", "C++ ops")),
}


def _commands_in(text: str) -> list[str]:
    """The `megastream ...` commands in the fenced code blocks of a Markdown text, in order, each
    normalised to single spaces (comments, line continuations and the commands before `&&` dropped)."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            try:
                tokens = list(lex)
            except ValueError:  # not shell (the step diagram)
                continue
            segment: list[str] = []
            for tok in tokens + [";"]:
                if tok in ("&&", "||", ";", "|", "&"):
                    if segment and segment[0] == "megastream":
                        out.append(shlex.join(segment))
                    segment = []
                else:
                    segment.append(tok)
    return out


def _inline_commands(text: str) -> list[str]:
    """`megastream ...` spans in the prose (outside code blocks)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`(megastream(?:\s[^`]*)?)`", prose)


def _run(argv: list[str], cwd: Path, env: dict, check: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """Run `megastream ...` (as `python -m megastream`); return it and its cost in seconds: the wall
    clock, or the CPU time it used where that is less (a machine busy with other work stretches the
    wall clock of every command; the CPU time is still the command's own)."""
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megastream", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=5 * LIMIT_S)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode:
        raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, min(wall, cpu)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """(cwd, env): a temporary working directory with configs/ (as in the repository), and HOME and
    MEGASTREAM_CACHE inside it. The compiled ops are copied in from the user's cache when it has
    them (read only) and otherwise built there once, before any command is timed."""
    from megastream.machine import cache_dir

    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "configs").symlink_to(REPO / "configs")
    (cwd / "home").mkdir()
    cache = cwd / "cache"
    cache.mkdir()
    for ops_dir in cache_dir().glob("ops-*") if cache_dir().is_dir() else []:
        shutil.copytree(ops_dir, cache / ops_dir.name, symlinks=True, ignore=shutil.ignore_patterns("lock"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTREAM_")}
    env.update(HOME=str(cwd / "home"), MEGASTREAM_CACHE=str(cache), PYTHONPATH=str(REPO), OMP_NUM_THREADS="2",
               MPLCONFIGDIR=str(cwd / "home" / "mpl"), CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", "from megastream import ops; ops.have_ext()"], cwd=cwd, env=env,
                   check=True, timeout=600)
    return cwd, env


def test_every_readme_command_is_known():
    """README cannot gain a `megastream` command this test does not run, nor lose one it expects."""
    shown = _commands_in(README.read_text())
    assert shown, "no megastream commands found in README.md's code blocks"
    unknown = [c for c in shown if c not in COMMANDS]
    assert not unknown, f"README.md shows megastream commands tests/test_readme.py does not know: {unknown}; " \
                        "add each to COMMANDS with its exit code"
    stale = [c for c in COMMANDS if c not in shown]
    assert not stale, f"COMMANDS lists commands README.md no longer shows: {stale}"


def test_inline_commands_name_real_subcommands_and_options():
    from megastream.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    spans = _inline_commands(README.read_text())
    assert spans
    for span in spans:
        words = shlex.split(span)
        if len(words) == 1:
            continue
        assert words[1] in sub.choices, f"README: `{span}`: no subcommand {words[1]!r}"
        options = set(sub.choices[words[1]]._option_string_actions)
        bad = [w for w in words[2:] if w.startswith("-") and w.split("=")[0] not in options]
        assert not bad, f"README: `{span}`: {words[1]} has no option(s) {bad}"


def test_command_parser_reads_blocks_as_a_shell_would():
    text = ("```bash\npip install -e . && megastream demo   # comment\n"
            "megastream plan a.yaml \\\n    --json\npython x.py\n```\nmegastream prose\n")
    assert _commands_in(text) == ["megastream demo", "megastream plan a.yaml --json"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_command(sandbox, command):
    cwd, env = sandbox
    if command not in _commands_in(README.read_text()):
        pytest.skip("not in README.md (test_every_readme_command_is_known reports it)")
    case = COMMANDS[command]
    if case.setup:
        globals()[case.setup](cwd, env)
    proc, cost = _run(shlex.split(command) + list(case.add), cwd, env)
    output = proc.stdout + proc.stderr
    rc = case.rc
    if case.plan_verdict:
        from megastream.machine import machine

        fits = "verdict: fits" in output or '"fits": true' in output
        assert machine().gpus or not fits, "a 24 GB-GPU plan cannot fit a machine without a GPU"
        rc = 0 if fits else 1
    assert proc.returncode == rc, f"{command}: exit {proc.returncode}, README promises {rc}:\n{output[-3000:]}"
    for text in case.says:
        assert text in output, f"{command}: {text!r} not in its output:\n{output[-3000:]}"
    for path in case.writes:  # a path may hold a glob (the token cache's directory is its key)
        assert [p for p in cwd.glob(path) if p.is_file()], f"{command}: did not write {path}"
    if "--json" in command:
        json.loads(proc.stdout)
    for path in case.leaves_no:
        assert not (cwd / path).exists(), f"{command}: wrote {path}"
    assert cost < LIMIT_S, f"{command} took {cost:.0f} s (> {LIMIT_S} s)"
