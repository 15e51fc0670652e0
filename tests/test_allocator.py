"""`reuse_freed_memory`: a large tensor freed and allocated again reuses warm pages.

Each case runs in a fresh interpreter: the setting is process-wide and lasting, and other tests
measure the resident set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Page faults of each of ten 64 MiB tensors, allocated, filled and freed one after the other.
# With memory reused the first few may still fault (the heap settles: measured, faults stop by
# the fifth); from then on none should.
PROBE = """
import json, resource, sys, torch
from pvtlab.utils.allocator import freed_memory_is_reused, reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(json.dumps({"applied": applied, "reused": freed_memory_is_reused(), "faults": faults[-4:]}))
"""
PAGES_IN_64_MIB = 64 * 2**20 // 4096

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_malloc_faults_every_large_block_in_again() -> None:
    result = _probe("default")
    assert result["reused"] is False
    assert min(result["faults"]) > PAGES_IN_64_MIB // 2


def test_reused_block_faults_no_pages_in() -> None:
    result = _probe("reuse")
    assert result["applied"] is True and result["reused"] is True
    assert max(result["faults"]) < PAGES_IN_64_MIB // 20


def test_environment_settings_win() -> None:
    result = _probe("reuse", MALLOC_MMAP_THRESHOLD_="131072")
    assert result["applied"] is False and result["reused"] is False
    assert min(result["faults"]) > PAGES_IN_64_MIB // 2


def test_entry_point_configs_turn_the_setting_on() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import CONF_DIR

    for name in ("train", "eval", "bench"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            assert compose(name).reuse_freed_memory is True, name
