"""The serving process collects cycles rarely, never walks what start-up built, hands the GIL
over sooner than Python's default, and keeps glibc to two malloc arenas."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meter_gateway import server


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds, switch = gc.get_threshold(), sys.getswitchinterval()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    sys.setswitchinterval(switch)


def test_tune_runtime_freezes_start_up_objects_and_raises_the_thresholds(
    restored_gc: None,
) -> None:
    built_at_start_up = [object() for _ in range(10)]  # noqa: F841 - alive while frozen
    server._tune_runtime()
    assert gc.get_threshold() == server.GC_THRESHOLDS
    assert sys.getswitchinterval() == pytest.approx(server.SWITCH_INTERVAL_S)
    assert gc.get_freeze_count() > 0
    # cycles made while serving are still collected
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


# In a fresh interpreter: threads that allocate at once, then glibc's own account of its arenas
# (malloc_info: one <heap> element per arena).
_ARENAS = """
import ctypes, sys, threading
from meter_gateway import server
if sys.argv[1] == "limit":
    server._limit_malloc_arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
start = threading.Barrier(16)

def work():
    start.wait()
    blocks = [libc.malloc(1024) for _ in range(2000)]
    for b in blocks:
        libc.free(b)

threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads:
    t.start()
for t in threads:
    t.join()
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
libc.open_memstream.restype = ctypes.c_void_p
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(buf.value.decode().count("<heap nr="))
"""


def test_the_server_keeps_glibc_to_two_malloc_arenas() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def arenas(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _ARENAS, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout)

    assert arenas("limit") <= server.MALLOC_ARENAS
    assert arenas("default") > server.MALLOC_ARENAS  # (what the limit is for)
