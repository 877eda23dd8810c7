"""Built-in sample data: layout, JPEG content, determinism, caching, atomic concurrent creation.

Small per-class counts keep the whole file well under 20 s; the default counts are the real set.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines import sample_data as sd

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(per_class_train=6, per_class_val=3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return sd.ensure_sample_data(0, tmp_path_factory.mktemp("cache"), **SMALL)


def _files(root):
    return sorted(root.glob("*/*/*.JPEG"))


def test_layout_and_counts(small_set):
    assert small_set.name.startswith(f"sample-v{sd.FORMAT_VERSION}-seed0")
    assert (small_set / sd.MARKER).is_file()
    for split, n in (("train", 6), ("val", 3)):
        classes = sorted(p.name for p in (small_set / split).iterdir())
        assert classes == list(sd.CLASS_DIRS) and len(classes) == 10
        assert [c.split("_", 1)[1] for c in classes] == list(sd.CLASSES)
        for c in classes:
            assert len(list((small_set / split / c).glob("*.JPEG"))) == n
    assert not list(small_set.parent.glob(".*tmp-*"))        # no temp leftovers


def test_real_jpegs_mixed_sizes_some_grey(small_set):
    modes, sizes = [], set()
    for f in _files(small_set):
        with Image.open(f) as im:
            assert im.format == "JPEG"
            im.load()                                          # decodes fully
            modes.append(im.mode)
            w, h = im.size
        assert 72 <= min(w, h) <= 160 and 0.59 <= w / h <= 1.71
        sizes.add((w, h))
    assert set(modes) <= {"RGB", "L"} and 1 <= modes.count("L") <= 0.15 * len(modes)
    assert len(sizes) > 30
    assert any(w > 1.2 * h for w, h in sizes) and any(h > 1.2 * w for w, h in sizes)


def test_deterministic_per_seed(small_set, tmp_path):
    again = sd.ensure_sample_data(0, tmp_path / "a", **SMALL)
    other = sd.ensure_sample_data(1, tmp_path / "b", **SMALL)
    assert other.name != again.name
    for f in _files(small_set)[::17]:
        rel = f.relative_to(small_set)
        assert (again / rel).read_bytes() == f.read_bytes()
        assert (other / rel).read_bytes() != f.read_bytes()


def test_second_call_reuses_cache(small_set, monkeypatch):
    files = _files(small_set)
    before = {f: f.stat().st_mtime_ns for f in files + [small_set / sd.MARKER]}
    monkeypatch.setattr(sd, "generate", lambda *a, **k: pytest.fail("regenerated a complete cache"))
    assert sd.ensure_sample_data(0, small_set.parent, **SMALL) == small_set
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_env_cache_dir_and_default_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ROTNET_CACHE", str(tmp_path / "env"))
    root = sd.ensure_sample_data(5, per_class_train=1, per_class_val=1)
    assert root.parent == tmp_path / "env" and root.name == f"sample-v{sd.FORMAT_VERSION}-seed5-1x1"
    assert len(_files(root)) == 20


def test_interrupted_build_leaves_no_complete_looking_set(tmp_path, monkeypatch):
    real = sd.generate

    def crash(out, *a):
        real(out, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(sd, "generate", crash)
    with pytest.raises(KeyboardInterrupt):
        sd.ensure_sample_data(0, tmp_path, per_class_train=2, per_class_val=1)
    assert list(tmp_path.iterdir()) == []                     # nothing under the final name, tmp removed
    monkeypatch.setattr(sd, "generate", real)
    (tmp_path / "sample-v1-seed0-2x1" / "train").mkdir(parents=True)   # half set without marker
    root = sd.ensure_sample_data(0, tmp_path, per_class_train=2, per_class_val=1)
    assert (root / sd.MARKER).is_file() and len(_files(root)) == 30


@pytest.mark.slow
def test_concurrent_creation_two_processes(tmp_path):
    code = ("import sys; from pipelines.sample_data import ensure_sample_data as e; "
            "print(e(0, sys.argv[1], per_class_train=8, per_class_val=4))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    root = Path(paths.pop())
    assert [p.name for p in tmp_path.iterdir()] == [root.name]   # one set, no temp leftovers
    assert (root / sd.MARKER).is_file() and len(_files(root)) == 10 * 12


def test_cli_prints_path_and_counts(tmp_path, monkeypatch, capsys):
    real = sd.ensure_sample_data
    monkeypatch.setattr(sd, "ensure_sample_data", lambda seed, out: real(seed, out, **SMALL))
    sd.main(["--seed", "2", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert Path(lines[0]).parent == tmp_path and "seed2" in lines[0]
    assert "train=60" in lines[1] and "val=30" in lines[1]


def test_an_empty_data_root_is_the_sample_set_and_a_missing_split_is_named(tmp_path, monkeypatch):
    """with_data_root (train.py, eval.py): data.root "" -> the seed-0 sample set in the cache; a
    `require`d split missing -> ConfigError naming data.root and the split."""
    from pipelines import with_data_root
    from rotnet.config import ConfigError, load_config

    made = tmp_path / f"sample-v{sd.FORMAT_VERSION}-seed0"
    (made / "train").mkdir(parents=True)
    (made / sd.MARKER).write_text("{}")   # a complete set: found, not generated
    monkeypatch.setenv("ROTNET_CACHE", str(tmp_path))
    cfg = load_config(None)   # data.root defaults to ""
    assert with_data_root(cfg, require=("train",)).data.root == str(made)
    assert cfg.data.root == ""   # a resolved copy; the loaded config is left as it was
    with pytest.raises(ConfigError, match=r"data.root='.*seed0' has no val/ folder"):
        with_data_root(cfg, require=("train", "val"))
    other = tmp_path / "other"   # another seed's set, or any dataset: data.root as given
    (other / "train").mkdir(parents=True)
    assert with_data_root(load_config(None, [f"data.root={other}"]), ("train",)).data.root == str(other)
