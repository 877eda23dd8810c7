"""benchmarks/report.py: the CPU named beside every figure tells the CPU kinds apart; the benchmark
log only gains lines (its ledger, and every commit since it became append-only again); publish."""
import subprocess

import pytest

from benchmarks.report import LEDGER, LOG, cpu_name, line_hashes, lost_lines, publish

BLOCK = ("processor\t: {i}\nvendor_id\t: X\ncpu family\t: {fam}\nmodel\t\t: {model}\n"
         "model name\t: {name}\nflags\t\t: {flags}\n")


def _cpuinfo(tmp_path, fam, model, name, flags):
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(BLOCK.format(i=i, fam=fam, model=model, name=name, flags=flags)
                               for i in range(2)))
    return path


def test_cpu_name_gives_family_model_and_bf16(tmp_path):
    zen3 = _cpuinfo(tmp_path, 25, 1, "AMD EPYC", "fpu sse2 avx avx2 fma")
    assert cpu_name(zen3) == "AMD EPYC (family 25 model 1; AVX2, no native bf16)"
    zen4 = _cpuinfo(tmp_path, 25, 17, "AMD EPYC", "avx2 avx512f avx512_bf16")
    assert cpu_name(zen4) == "AMD EPYC (family 25 model 17; AVX-512, AVX512-BF16)"
    spr = _cpuinfo(tmp_path, 6, 143, "Intel(R) Xeon(R) Platinum",
                   "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    assert cpu_name(spr) == "Intel(R) Xeon(R) Platinum (family 6 model 143; AVX-512, AMX)"


def test_cpu_name_without_cpuinfo_falls_back(tmp_path):
    assert cpu_name(tmp_path / "missing")   # platform's processor or machine name, never empty


def test_publish_prints_and_adds_the_block_unless_told_not_to(tmp_path, capsys):
    out = tmp_path / "bench.md"
    publish("| a |\n", out, "## Mine", write=False)
    assert not out.exists() and "| a |" in capsys.readouterr().out
    publish("| a |\n", out, "## Mine", intro="Intro.")
    assert "## Mine\n\nIntro.\n\n| a |\n" in out.read_text() and "added to" in capsys.readouterr().out


# ---------------------------------------------------------------------------- append-only log

# The last commit before the log became append-only again: every commit after it only adds lines.
APPEND_ONLY_SINCE = "b59bdc55e80f8eaf8563c240d3048ffa387ac9dc"


def test_the_log_keeps_every_line_of_its_ledger():
    """Works in any checkout, shallow or none: the ledger is checked in beside the log."""
    lost = lost_lines(LEDGER.read_text().split(), line_hashes(LOG.read_text(encoding="utf-8")))
    assert not lost, f"{LOG}: lines {[i + 1 for i in lost]} of the recorded log were edited or removed"


def test_a_planted_edit_or_removal_fails_and_added_lines_pass(tmp_path):
    lines = LOG.read_text(encoding="utf-8").splitlines()
    ledger = line_hashes("\n".join(lines))   # the log's own lines, as the ledger records them
    row = next(i for i, line in enumerate(lines) if line.startswith("| leak:torch |"))   # an early row
    edited = lines[:row] + [lines[row].replace("|", " |", 1)] + lines[row + 1:]
    removed = lines[:row] + lines[row + 1:]
    added = lines[:row + 1] + ["", "Note: a line added after a block."] + lines[row + 1:] + ["## New", ""]
    for name, text in (("edited", edited), ("removed", removed), ("added", added)):
        copy = tmp_path / f"{name}.md"
        copy.write_text("\n".join(text) + "\n")
        lost = lost_lines(ledger, line_hashes(copy.read_text()))
        assert lost == ([] if name == "added" else [row]), (name, lost)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=LOG.parents[1], capture_output=True, text=True)


def test_no_commit_since_edited_or_removed_a_line():
    """Lines added after the ledger was last recorded are guarded by history, where there is some."""
    if _git("cat-file", "-e", APPEND_ONLY_SINCE + "^{commit}").returncode != 0:
        pytest.skip("no git history back to the append-only start (shallow or no checkout); ledger test ran")
    rel = str(LOG.relative_to(LOG.parents[1]))
    commits = _git("rev-list", "--reverse", f"{APPEND_ONLY_SINCE}..HEAD", "--", rel).stdout.split()
    versions = [(c, _git("show", f"{c}^:{rel}").stdout, _git("show", f"{c}:{rel}").stdout) for c in commits]
    versions.append(("the working tree", _git("show", f"HEAD:{rel}").stdout, LOG.read_text(encoding="utf-8")))
    for where, old, new in versions:
        lost = lost_lines(old.splitlines(), new.splitlines())
        assert not lost, f"{where} edited or removed lines {[i + 1 for i in lost]} of {rel}"
