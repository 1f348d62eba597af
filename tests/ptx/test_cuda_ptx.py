"""Every example's generated kernels compile to PTX for sm_80 and sm_90 (float32, production
tiles 64x64 forward / 32x32 backward, feature sizes 64), assemble with ptxas without spills, and
contain no float64 arithmetic. No GPU needed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install 'attndsl[cuda]'")

import attndsl
from attndsl.codegen import cuda_toolchain as tc
from attndsl.codegen.numba_cuda import LINEAR_KERNELS
from attndsl.runtime.cuda_kernel import KERNELS, compile_kernel

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.attn"))
CCS = [(8, 0), (9, 0)]
SMEM_LIMIT = 48 * 1024
# Known, measured regressions, each with its bound in bytes; remove an entry once fixed.
# latent_rope's forward holds q's and rq's rows and acc in registers (3 x 64 words); the
# q_offset/k_offset positions added a few more and ptxas spills 8 bytes on sm_90 at 254
# registers (sm_80 fits since the offsets are int32 on the device).
KNOWN_SPILLS = {("latent_rope", "attn_fwd", "sm_90"): 16}


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_assembles_without_spills_or_f64(path, cc):
    kernel = compile_kernel(attndsl.load(path))
    ptxs = kernel.ptx(cc=cc, dtype="float32")
    linear = LINEAR_KERNELS if kernel.plan.linear_path else ()
    assert sorted(ptxs) == sorted(KERNELS + linear)
    for name, ptx in ptxs.items():
        assert tc.f64_instructions(ptx) == [], f"{name}: float64 in a float32 kernel"
        report = tc.assemble(ptx, cc)
        allowed = KNOWN_SPILLS.get((path.stem, name, f"sm_{cc[0]}{cc[1]}"), 0)
        assert report.spill_stores <= allowed and report.spill_loads <= allowed, (
            f"{path.stem} {name} sm_{cc[0]}{cc[1]}: {report.registers} registers, spills "
            f"{report.spill_stores}/{report.spill_loads} bytes")
        assert report.shared_bytes <= SMEM_LIMIT


def test_float64_ptx_compiles():
    # float64 kernels exist too (f64 is expected there); 32x32 tiles fit in 48 KiB
    kernel = compile_kernel(attndsl.load(EXAMPLES[0].parent / "causal.attn"))
    ptxs = kernel.ptx(cc=(8, 0), dtype="float64")
    assert all(tc.has_f64(ptx) for ptx in ptxs.values())
    fwd = tc.assemble(ptxs["attn_fwd"], (8, 0))
    assert fwd.shared_bytes <= SMEM_LIMIT


def test_cli_emit_ptx(capsys):
    from attndsl.cli import main

    path = str(EXAMPLES[0].parent / "softcap.attn")
    assert main(["emit", path, "--target", "ptx", "--cc", "90"]) == 0
    text = capsys.readouterr().out
    for name in KERNELS:
        assert f"// ---- {name} ----" in text
    assert ".target sm_90" in text
    assert main(["emit", path, "--target", "cuda"]) == 0
    source = capsys.readouterr().out
    assert "def attn_bwd_dq(" in source and "F = np.float32" in source
