"""Atomic writes: a reader or a crash sees the old file or the new one, never half of one."""

import os

import pytest

from ddpm.files import write_atomically


def test_writes_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    write_atomically(path, lambda f: f.write(b"hello"))
    assert path.read_bytes() == b"hello"
    assert os.listdir(path.parent) == ["a.bin"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def fail_halfway(f):
        f.write(b"ne")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_atomically(path, fail_halfway)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_a_full_disk_is_an_oserror_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    os.symlink("/dev/full", tmp_path / ".a.bin.tmp")  # the kernel's own ENOSPC on flush
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, lambda f: f.write(b"x" * 100_000))
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_the_file_gets_the_usual_permissions(tmp_path):
    path = tmp_path / "a.bin"
    write_atomically(path, lambda f: f.write(b""))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
