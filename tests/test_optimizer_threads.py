"""The optimizer thread's OpenMP team follows engine.threads (issue 12, section 1, item 4).

OpenMP's team size (nthreads-var) is per thread: a thread the main thread starts begins from the
process default (every core, or OMP_NUM_THREADS), not from what the main thread set, so the C++
optimizer op's parallel regions would take every core. The team size is read here straight from
the OpenMP runtime torch loaded (torch.get_num_threads() would first copy torch's own setting into
the calling thread, hiding the fault)."""

import ctypes
import re
import threading

import pytest
import torch

from megastream.config import Config, EngineConfig
from megastream.engine.engine import Engine
from megastream.engine.streams import DONE
from megastream.model.layout import model_layout
from megastream.optim import OptimizerWorker
from megastream.store import HostStore
from test_engine import _spec


def _openmp():
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip()
            if re.fullmatch(r"lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*", path.rsplit("/", 1)[-1]):
                return ctypes.CDLL(path)
    pytest.skip("no OpenMP runtime in this process")


def _on_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _on_worker(worker, fn):
    """Run fn as an update on the worker's thread; returns its result."""
    out = []
    worker._update = lambda u, hyper: out.append(fn())
    worker.submit(0, DONE, None)
    worker.wait(0)
    return out[0]


@pytest.fixture
def omp():
    lib = _openmp()
    main = torch.get_num_threads()
    yield lib
    torch.set_num_threads(main)  # the workers' setting is also torch's default for threads started later


def test_worker_thread_uses_the_configured_thread_count(omp):
    fresh = _on_new_thread(omp.omp_get_max_threads)  # what any new thread starts from
    want = fresh + 1  # differs from the default whatever the core count
    worker = OptimizerWorker(lambda u, h: None, threads=want)
    try:
        seen = _on_worker(worker, lambda: (omp.omp_get_max_threads(), torch.get_num_threads()))
    finally:
        worker.close()
    assert seen == (want, want)


def test_worker_thread_defaults_to_the_main_threads_count(omp):
    fresh = _on_new_thread(omp.omp_get_max_threads)
    torch.set_num_threads(fresh + 1)  # as train() does for engine.threads, on the main thread
    worker = OptimizerWorker(lambda u, h: None)  # threads=0: torch's default, i.e. the main thread's
    try:
        assert _on_worker(worker, omp.omp_get_max_threads) == fresh + 1
    finally:
        worker.close()


def test_engine_threads_reaches_the_optimizer_thread(omp):
    spec = _spec(False)
    store = HostStore(model_layout(spec), torch.float32, torch.float32, pin=False)
    want = _on_new_thread(omp.omp_get_max_threads) + 1
    engine = Engine(spec, store, Config(engine=EngineConfig(threads=want)), torch.device("cpu"))
    try:
        assert _on_worker(engine.worker, omp.omp_get_max_threads) == want
    finally:
        engine.close()


def test_worker_rejects_a_negative_thread_count():
    with pytest.raises(ValueError, match="threads must be >= 0"):
        OptimizerWorker(lambda u, h: None, threads=-1)
