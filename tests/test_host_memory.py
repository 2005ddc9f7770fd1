"""`keep_host_memory`: with glibc, a large CPU tensor freed and allocated again reuses the
process's pages instead of faulting fresh ones in; with it off, malloc gives them back."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

import moa.training
from moa.errors import ConfigError
from moa.training.run_config import parse_run

# In a fresh interpreter: allocate, touch and free a 64 MiB tensor a few times, as training
# steps do; report the last time's page faults and the resident memory its free released.
PROBE = """
import json, resource, sys, torch
from moa.training.host_memory import keep_freed
kept = keep_freed() if sys.argv[1] == "keep" else False
def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
for step in range(4):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(16 * 2**20)  # 64 MiB
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    before_free = resident_mib()
    del tensor
    released = before_free - resident_mib()
print(json.dumps({"kept": kept, "released_mib": released, "faults": faults}))
"""
PAGES = 64 * 2**20 // 4096


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_stays_with_the_process():
    default, kept = _probe("default"), _probe("keep")
    assert not default["kept"] and kept["kept"]
    assert default["released_mib"] > 48  # glibc unmapped the 64 MiB block
    assert kept["released_mib"] < 8  # ... and kept it here
    assert default["faults"] > PAGES / 2  # each new tensor faulted its pages in
    assert kept["faults"] < PAGES / 8  # ... and reused the last one's here


def test_keep_host_memory_must_be_a_bool(compose_config):
    with pytest.raises(ConfigError, match="keep_host_memory='sometimes'; allowed: true | false"):
        parse_run(compose_config("keep_host_memory=sometimes"))
    parse_run(compose_config("keep_host_memory=false"))


class KeptMemory(Exception):
    pass


class BuiltData(Exception):
    pass


@pytest.mark.parametrize("keep, first", [("true", KeptMemory), ("false", BuiltData)])
def test_training_keeps_host_memory_as_configured(compose_config, monkeypatch, keep, first):
    """train() tells malloc to keep freed memory before it builds anything, unless off."""
    def raise_(error):
        def hook(*args, **kwargs):
            raise error
        return hook

    monkeypatch.setattr(moa.training.train_task, "keep_freed", raise_(KeptMemory))
    monkeypatch.setattr(moa.training.train_task, "LMDataModule", raise_(BuiltData))
    with pytest.raises(first):
        moa.training.train(compose_config("trainer=smoke", f"keep_host_memory={keep}"))
