"""What ``dpa.base.cpu`` reads from /proc/cpuinfo: the model, AVX2 / AVX-512, native bf16."""

from __future__ import annotations

from dpa.base.cpu import cpu_info

_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2 sha_ni
"""
_SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile
"""
_ICELAKE = """model name\t: Intel(R) Xeon(R) Platinum 8375C
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512_vnni
"""


def test_an_epyc_without_avx512_or_bf16():
    info = cpu_info(_EPYC)
    assert (info.model, info.avx2, info.avx512, info.bf16, info.vector) == ("AMD EPYC 7B13", True, False, False, "AVX2")
    assert "AMD EPYC 7B13" in info.describe() and "no bf16" in info.describe()


def test_avx512_with_and_without_native_bf16():
    assert cpu_info(_SAPPHIRE).bf16 and cpu_info(_SAPPHIRE).vector == "AVX-512"
    assert cpu_info(_ICELAKE).avx512 and not cpu_info(_ICELAKE).bf16


def test_this_machine_and_its_json():
    data = cpu_info().as_json()
    assert set(data) >= {"model", "machine", "cores", "avx2", "avx512", "bf16", "vector", "summary"}
    assert data["cores"] >= 1 and data["summary"] == cpu_info().describe()
