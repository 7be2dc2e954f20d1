"""Where the C++ ops are built and how a build that was killed is recovered from (the build itself
is mocked: these check the directory protocol, not the compiler)."""

import os

import pytest
import torch

from megastream import ops


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A `load` that writes the library into its build directory; load_library recorded."""
    calls = {"built": [], "loaded": []}

    def load(name, build_directory, **kw):
        calls["built"].append(build_directory)
        (__import__("pathlib").Path(build_directory) / f"{name}.so").write_bytes(b"\x7fELF")

    monkeypatch.setattr("torch.utils.cpp_extension.load", load)
    monkeypatch.setattr(torch.ops, "load_library", lambda p: calls["loaded"].append(p))
    monkeypatch.setenv("MEGASTREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEGASTREAM_NO_EXT", raising=False)
    (tmp_path / "cache").mkdir()
    return calls


def _dirs(root):
    return sorted(p.name for p in root.iterdir())


def test_a_killed_build_never_blocks_the_next_start(tmp_path, fake_build):
    """Before: torch's build lock file, left by a build killed mid-way, made every later start wait on
    it forever. Now: a half-built directory is replaced; a dead process's temporary one is swept."""
    root = tmp_path / "cache"
    ops._build()  # learn the key from the first build
    (final,) = [p for p in root.iterdir() if p.name.startswith("ops-")]
    lib = next(final.glob("*.so"))
    lib.unlink()
    (final / "lock").write_text("")  # what a killed torch build leaves
    dead = root / f".{final.name}.tmp-999999999"
    dead.mkdir()
    fake_build["built"].clear()
    ops._build()
    assert len(fake_build["built"]) == 1 and f".tmp-{os.getpid()}" in fake_build["built"][0]
    assert _dirs(root) == [final.name] and lib.is_file() and not (final / "lock").exists()


def test_a_finished_build_is_loaded_without_building(tmp_path, fake_build):
    ops._build()
    fake_build["built"].clear()
    fake_build["loaded"].clear()
    ops._build()
    assert fake_build["built"] == [] and len(fake_build["loaded"]) == 1
    assert fake_build["loaded"][0].endswith(".so") and "/ops-" in fake_build["loaded"][0]


def test_a_build_another_process_finished_first_is_kept(tmp_path, fake_build, monkeypatch):
    """Two first runs build at once; the second rename finds the first one's directory and keeps it."""
    root = tmp_path / "cache"
    real_load = __import__("torch.utils.cpp_extension", fromlist=["load"]).load

    def racing_load(name, build_directory, **kw):
        real_load(name=name, build_directory=build_directory)
        other = root / f"ops-{name.rsplit('_', 1)[-1]}"
        other.mkdir()
        (other / f"{name}.so").write_bytes(b"theirs")

    monkeypatch.setattr("torch.utils.cpp_extension.load", racing_load)
    ops._build()
    (final,) = [p for p in root.iterdir() if p.name.startswith("ops-")]
    assert next(final.glob("*.so")).read_bytes() == b"theirs" and _dirs(root) == [final.name]
