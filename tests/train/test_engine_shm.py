"""When `init_distributed` lets DeepSpeed map its shared-memory all-reduce: every rank on this
machine (torchrun's LOCAL_WORLD_SIZE equal to WORLD_SIZE), no GPU, room in /dev/shm, and no
LOCAL_SIZE set by a launcher already."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

import sigma_moe.train.engine as E

LOCAL_SIZE_AT_IMPORT = os.environ.get("LOCAL_SIZE")


@pytest.fixture
def env(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SIGMA_MOE_SHM_ALLREDUCE"):
        # setenv first: monkeypatch then restores the variable (or its absence) afterwards,
        # including what _one_node_local_size writes behind its back
        monkeypatch.setenv(k, "x")
        monkeypatch.delenv(k)
    monkeypatch.setattr(E.torch.cuda, "is_available", lambda: False)
    return monkeypatch


def _room(env, free_bytes: int) -> None:
    env.setattr(E.os, "statvfs", lambda _: SimpleNamespace(f_bavail=free_bytes, f_frsize=1))


@pytest.mark.parametrize(
    "world,local,free_mb,want",
    [
        ("2", "2", 10_000, "2"),  # one node: mapped
        ("4", "4", 10_000, "4"),
        ("4", "2", 10_000, None),  # two nodes: DeepSpeed's shared memory cannot span them
        ("1", "1", 10_000, None),  # one process: nothing to reduce
        ("2", "2", 100, None),  # /dev/shm too small for two ~69 MB workspaces (Docker's 64 MB)
        ("2", None, 10_000, None),  # not torchrun: the launcher says nothing
    ],
)
def test_local_size_set_only_on_one_node_with_room(env, world, local, free_mb, want):
    env.setenv("WORLD_SIZE", world)
    if local is not None:
        env.setenv("LOCAL_WORLD_SIZE", local)
    _room(env, free_mb * 2**20)
    E._one_node_local_size()
    assert os.environ.get("LOCAL_SIZE") == want


@pytest.mark.parametrize("case", ["launcher's value", "switched off", "cuda"])
def test_left_alone(env, case):
    """A launcher's LOCAL_SIZE is kept; SIGMA_MOE_SHM_ALLREDUCE=0 or a GPU sets none."""
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    if case == "launcher's value":
        env.setenv("LOCAL_SIZE", "1")
    elif case == "switched off":
        env.setenv("SIGMA_MOE_SHM_ALLREDUCE", "0")
    else:
        env.setattr(E.torch.cuda, "is_available", lambda: True)
    _room(env, 10**12)
    E._one_node_local_size()
    assert os.environ.get("LOCAL_SIZE") == ("1" if case == "launcher's value" else None)


def test_the_environment_is_restored():
    """After the tests above (same module, run in order): no LOCAL_SIZE left behind for the
    processes later tests spawn."""
    assert os.environ.get("LOCAL_SIZE") == LOCAL_SIZE_AT_IMPORT
