"""rotnet.atomic: a failed write keeps the earlier file whole and leaves no temporary file; the
rename happens only after the block, so work inside it (a shard's index) lands first."""
import os

import pytest

from rotnet.atomic import TMP, atomic_path, write_text


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
            assert os.path.basename(tmp) == TMP + "checkpoint.pt"
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
