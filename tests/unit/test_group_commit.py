"""GroupCommit: many threads, one writer, one transaction per group; a bad
item fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.runner import GroupCommit


def test_items_written_together_each_caller_gets_its_own_result() -> None:
    groups: list[list[int]] = []
    gate = threading.Event()

    def write(items: list[int]) -> list[int]:
        gate.wait(1)  # let callers pile up behind the first group
        groups.append(list(items))
        return [i * 10 for i in items]

    gc: GroupCommit[int, int] = GroupCommit("t", write)
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(gc, i) for i in range(40)]
            gate.set()
            assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(40)]
    finally:
        gc.close()
    assert sorted(i for g in groups for i in g) == list(range(40))
    assert len(groups) < 40  # grouped, not one write per item


def test_a_bad_item_fails_alone() -> None:
    def write(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad item")
        return items

    gc: GroupCommit[int, int] = GroupCommit("t", write)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = {i: pool.submit(gc, i) for i in range(10, 20)}
            for i, fut in futures.items():
                if i == 13:
                    with pytest.raises(ValueError, match="bad item"):
                        fut.result(timeout=10)
                else:
                    assert fut.result(timeout=10) == i
    finally:
        gc.close()
