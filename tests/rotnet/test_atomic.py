"""rotnet.atomic: a failed write keeps the earlier file whole and leaves no temporary file; the
rename happens only after the block, so work inside it (a shard's index) lands first."""
import errno
import os
import socket

import pytest

from rotnet.atomic import TMP, DiskFullError, atomic_path, write_bytes, write_text


def test_write_text_replaces_and_leaves_nothing_else(tmp_path):
    p = tmp_path / "list.txt"
    write_text(p, "a 0\n")
    write_text(str(p), "b 1\n")
    assert p.read_text() == "b 1\n" and os.listdir(tmp_path) == ["list.txt"]


def test_error_mid_write_keeps_the_earlier_file(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(p) as tmp:
            assert os.path.basename(tmp) == f"{TMP}checkpoint.pt.{socket.gethostname()}.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_rename_comes_after_the_block(tmp_path):
    p = tmp_path / "shard-000000.tar"
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"tar")
        assert not p.exists()                       # not under its final name yet
        write_text(tmp_path / "shard-000000.idx", "index")
    assert p.read_bytes() == b"tar"
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.idx", "shard-000000.tar"]


def test_a_full_disk_names_the_file_the_bytes_needed_and_free(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"old")
    with pytest.raises(DiskFullError) as e:
        with atomic_path(p, size=5000) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(e.value).startswith(f"disk full writing {p}: it needs 5000 bytes, ")
    assert " bytes free there" in str(e.value) and e.value.__cause__ is None
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_full_disk_of_unknown_size_says_what_was_written(tmp_path):
    with pytest.raises(DiskFullError, match="needs more than the 4 bytes written"):
        with atomic_path(tmp_path / "shard.tar") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert os.listdir(tmp_path) == []


def test_a_real_full_disk(small_disk):
    write_bytes(small_disk / "a.bin", b"x" * 1000)
    with pytest.raises(DiskFullError, match=rf"disk full writing {small_disk}/a.bin: it needs 2000000 bytes, "
                                            r"\d+ bytes free there"):
        write_bytes(small_disk / "a.bin", b"y" * 2_000_000)
    assert os.listdir(small_disk) == ["a.bin"] and (small_disk / "a.bin").read_bytes() == b"x" * 1000
