"""keep_freed_memory: large blocks come from the heap (no mmap per tensor), only in processes
that ask for it (the console command and Ray tasks), and HARNESS_MALLOC=default opts out.

Each case runs in a child process: the allocator setting is process-wide and cannot be undone.
glibc's mallinfo2 counts the blocks it serves with mmap (``hblks``): a 64 MB tensor is one by
default and none once the setting took.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

PROBE = r"""
import ctypes, json, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                 "keepcost").split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
took = None
if sys.argv[1] == "keep":
    from harness.host_memory import keep_freed_memory
    took = keep_freed_memory()
elif sys.argv[1] == "cli":
    from unittest import mock
    from harness import cli
    with mock.patch.object(cli, "main", return_value=0):
        cli.entry()
elif sys.argv[1] == "main":
    from harness import cli
    try:
        cli.main(["--help"])
    except SystemExit:
        pass
before = libc.mallinfo2().hblks
t = torch.empty(16 * 1024 * 1024)  # 64 MB
t.fill_(1.0)
print(json.dumps({"took": took, "mmapped_blocks": libc.mallinfo2().hblks - before}))
"""


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_allocator_maps_a_large_tensor():
    assert _probe("none")["mmapped_blocks"] == 1


def test_kept_memory_serves_large_tensors_from_the_heap():
    r = _probe("keep", HARNESS_MALLOC="")
    assert r == {"took": True, "mmapped_blocks": 0}


def test_opt_out_keeps_glibc_defaults():
    r = _probe("keep", HARNESS_MALLOC="default")
    assert r == {"took": False, "mmapped_blocks": 1}


def test_console_entry_applies_it_and_main_does_not():
    assert _probe("cli", HARNESS_MALLOC="")["mmapped_blocks"] == 0
    assert _probe("main", HARNESS_MALLOC="")["mmapped_blocks"] == 1


def test_console_script_points_at_the_entry():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["harness"] == "harness.cli:entry"
