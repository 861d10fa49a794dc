"""The simulated disk keeps exactly what was made durable, and may keep more."""

from __future__ import annotations

import random

import pytest

from memosd.wal import SimulatedDisk


def images(disk: SimulatedDisk, count: int = 200) -> list[SimulatedDisk]:
    rng = random.Random(7)
    return [disk.crash_image(rng) for _ in range(count)]


def durable_setup() -> tuple[SimulatedDisk, int]:
    disk = SimulatedDisk()
    disk.makedirs("/d")
    disk.fsync_dir("/")
    fd = disk.open_write("/d/f")
    disk.write(fd, b"synced", 0)
    disk.fdatasync(fd)
    disk.fsync_dir("/d")
    return disk, fd


def test_synced_data_and_entries_always_survive() -> None:
    disk, _fd = durable_setup()
    for image in images(disk):
        assert image.read_file("/d/f") == b"synced"


def test_unsynced_write_may_be_dropped_kept_torn_or_zeroed() -> None:
    disk, fd = durable_setup()
    disk.write(fd, b"-pending", 6)
    seen = {image.read_file("/d/f") for image in images(disk)}
    assert b"synced" in seen  # dropped
    assert b"synced-pending" in seen  # kept
    assert b"synced" + bytes(8) in seen  # zeroed
    assert any(len(s) not in (6, 14) for s in seen)  # torn
    assert all(s.startswith(b"synced") for s in seen)


def test_a_writeback_hint_makes_nothing_durable() -> None:
    disk, fd = durable_setup()
    disk.write(fd, b"-pending", 6)
    disk.start_writeback(fd, 6, 8)
    seen = {image.read_file("/d/f") for image in images(disk)}
    assert b"synced" in seen  # still may be dropped
    assert b"synced-pending" in seen


def test_new_file_needs_a_directory_fsync() -> None:
    disk, _fd = durable_setup()
    fd = disk.open_write("/d/g")
    disk.write(fd, b"data", 0)
    disk.fdatasync(fd)
    present = [("g" in image.listdir("/d")) for image in images(disk)]
    assert any(present)
    assert not all(present)
    disk.fsync_dir("/d")
    assert all("g" in image.listdir("/d") for image in images(disk))


def test_remove_and_rename_are_durable_only_after_directory_fsync() -> None:
    disk, _fd = durable_setup()
    disk.rename("/d/f", "/d/h")
    names = {tuple(image.listdir("/d")) for image in images(disk)}
    assert names == {("f",), ("h",)}
    disk.fsync_dir("/d")
    disk.remove("/d/h")
    assert {tuple(image.listdir("/d")) for image in images(disk)} == {("h",), ()}


def test_directory_lost_with_its_parent_entry() -> None:
    disk = SimulatedDisk()
    disk.makedirs("/a/b")
    for image in images(disk, 50):
        if "a" not in image.listdir("/"):
            with pytest.raises(FileNotFoundError):
                image.listdir("/a/b")


def test_all_crash_points_replays_every_step() -> None:
    disk = SimulatedDisk(record_history=True)
    disk.makedirs("/d")
    fd = disk.open_write("/d/f")
    disk.write(fd, b"x", 0)
    disk.fdatasync(fd)
    steps = [step for step, _state in disk.all_crash_points()]
    assert steps == [0, 1, 2, 3, 4]
    assert disk.step == 4
    final = list(disk.all_crash_points())[-1][1]
    assert final.read_file("/d/f") == b"x"
