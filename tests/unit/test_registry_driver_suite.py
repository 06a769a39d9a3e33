"""The storage driver conformance suite (as distribution's driver/testsuites): every test runs on
the filesystem driver and on the in-memory driver, so both keep the one contract the stores rely
on — content, appending writers with their lock, move-then-put, listing, walking, deletion,
locks and path checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockyard.registry.driver import FilesystemDriver, StorageDriver
from dockyard.registry.errors import InvalidPath, PathLocked, PathNotFound
from dockyard.registry.memdriver import MemoryDriver


@pytest.fixture(params=["filesystem", "memory"])
def driver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageDriver]:
    if request.param == "filesystem":
        yield FilesystemDriver(str(tmp_path / "root"))
    else:
        yield MemoryDriver()


def test_put_then_get_content_and_overwrite(driver: StorageDriver) -> None:
    driver.put_content("a/b/link", b"one")
    assert driver.get_content("a/b/link") == b"one"
    driver.put_content("a/b/link", b"two")
    assert driver.get_content("a/b/link") == b"two"
    assert driver.stat("a/b/link").size == 3
    assert not driver.stat("a/b/link").is_dir


def test_missing_paths_are_path_not_found(driver: StorageDriver) -> None:
    driver.put_content("x/file", b"1")
    for call in (
        lambda: driver.get_content("x/none"),
        lambda: driver.reader("x/none"),
        lambda: driver.stat("x/none"),
        lambda: driver.list("x/none"),
        lambda: driver.list("x/file"),  # a file is no directory
        lambda: list(driver.walk("x/none")),
        lambda: driver.delete("x/none"),
        lambda: driver.writer("x/none", append=True),
    ):
        with pytest.raises(PathNotFound):
            call()


@pytest.mark.parametrize("path", ["../x", "/abs", "a/./b", "a/../b", "a b", "a\x00b", "a//b"])
def test_paths_outside_the_root_are_refused(driver: StorageDriver, path: str) -> None:
    with pytest.raises(InvalidPath):
        driver.put_content(path, b"x")
    with pytest.raises(InvalidPath):
        driver.get_content(path)


def test_reader_starts_at_its_offset(driver: StorageDriver) -> None:
    driver.put_content("blob", b"0123456789")
    with driver.reader("blob", 4) as f:
        assert f.read() == b"456789"


def test_writer_appends_truncates_and_cancels(driver: StorageDriver) -> None:
    w = driver.writer("up/data")
    w.write(b"hello")
    w.commit()
    w.close()
    w = driver.writer("up/data", append=True)
    assert w.size == 5
    w.write(b" world")
    w.truncate(5)  # a refused chunk taken back
    w.write(b"!")
    w.close()
    assert driver.get_content("up/data") == b"hello!"
    w = driver.writer("up/other")
    w.write(b"gone")
    w.cancel()
    with pytest.raises(PathNotFound):
        driver.stat("up/other")


def test_an_appending_writer_holds_the_lock_until_closed(driver: StorageDriver) -> None:
    driver.writer("up/data").close()
    first = driver.writer("up/data", append=True)
    with pytest.raises(PathLocked):
        driver.writer("up/data", append=True)
    first.close()
    second = driver.writer("up/data", append=True)  # free again
    second.close()


def test_a_writer_follows_the_file_it_holds_through_a_move(driver: StorageDriver) -> None:
    driver.writer("up/data").close()
    held = driver.writer("up/data", append=True)
    held.write(b"abc")
    driver.move_then_put("up/data", "blobs/x/data", "links/x", b"x")
    held.close()
    assert driver.get_content("blobs/x/data") == b"abc"
    with pytest.raises(PathNotFound):  # the upload's path is empty now: never written again
        driver.writer("up/data", append=True)


def test_move_then_put_places_both_and_refuses_a_missing_source(driver: StorageDriver) -> None:
    driver.put_content("up/data", b"blob")
    driver.move_then_put("up/data", "b/sha/data", "r/_layers/link", b"sha:1")
    assert driver.get_content("b/sha/data") == b"blob"
    assert driver.get_content("r/_layers/link") == b"sha:1"
    with pytest.raises(PathNotFound):
        driver.stat("up/data")
    with pytest.raises(PathNotFound):
        driver.move_then_put("up/data", "b/other/data", "r/other/link", b"x")
    with pytest.raises(PathNotFound):
        driver.stat("r/other/link")  # nothing linked to a blob that was never moved


def test_list_names_direct_children_sorted_and_keeps_empty_directories(
    driver: StorageDriver,
) -> None:
    driver.put_content("d/b/file", b"1")
    driver.put_content("d/a", b"2")
    driver.put_content("d/c/deep/file", b"3")
    assert driver.list("d") == ["d/a", "d/b", "d/c"]
    assert "d" in driver.list("")
    assert driver.stat("d/c").is_dir
    driver.delete("d/b/file")
    assert driver.list("d/b") == []  # the directory outlives its last file


def test_walk_yields_every_file_below_and_no_directory(driver: StorageDriver) -> None:
    driver.put_content("w/x/link", b"1")
    driver.put_content("w/y/z/link", b"22")
    driver.put_content("w/top", b"333")
    found = {info.path: info.size for info in driver.walk("w")}
    assert found == {"w/x/link": 1, "w/y/z/link": 2, "w/top": 3}
    assert all(not info.is_dir for info in driver.walk("w"))


def test_delete_removes_a_file_or_a_whole_tree(driver: StorageDriver) -> None:
    driver.put_content("t/keep", b"k")
    driver.put_content("t/tree/a", b"a")
    driver.put_content("t/tree/sub/b", b"b")
    driver.delete("t/tree")
    assert driver.list("t") == ["t/keep"]
    driver.delete("t/keep")
    assert driver.list("t") == []


def test_modification_times_follow_writes(driver: StorageDriver) -> None:
    driver.put_content("m/link", b"1")
    before = driver.stat("m/link").mtime
    assert abs(before - time.time()) < 60
    time.sleep(0.02)
    driver.put_content("m/link", b"2")
    assert driver.stat("m/link").mtime >= before


def test_an_exclusive_lock_waits_for_shared_holders(driver: StorageDriver) -> None:
    events: list[str] = []
    shared_held = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with driver.lock("locks/gc", exclusive=False):
            events.append("shared")
            shared_held.set()
            release.wait(5)
            events.append("shared released")

    thread = threading.Thread(target=reader)
    thread.start()
    assert shared_held.wait(5)
    with driver.lock("locks/gc", exclusive=False):  # shared holders share
        events.append("second shared")
    timer = threading.Timer(0.2, release.set)
    timer.start()
    with driver.lock("locks/gc", exclusive=True):
        events.append("exclusive")
    thread.join(5)
    assert events == ["shared", "second shared", "shared released", "exclusive"]


def test_a_sweep_of_a_clean_root_finds_nothing(driver: StorageDriver) -> None:
    driver.put_content("s/file", b"1")
    sweep = driver.sweep_stale(0.0, remove=True)
    assert sweep.removed == 0 and sweep.left == []
