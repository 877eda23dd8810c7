"""benchmarks/report.py: the CPU named beside every figure tells the CPU kinds apart; publish."""
from benchmarks.report import cpu_name, publish

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
