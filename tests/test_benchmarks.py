"""The benchmark script's arithmetic and output (no timing assertions: timings belong to the script)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from modeling_matpac import MatpacConfig


sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import run as benchmarks  # noqa: E402


def test_block_flops_by_hand():
    # 2 tokens, width 4, MLP 8: projections 2*2*4*(4*4) + MLP 2*2*4*(2*8) + attention 4*2*2*4.
    assert benchmarks.block_flops(2, 4, 8) == 256 + 256 + 64


def test_vit_b_pretraining_costs_about_91_gflop_per_sample():
    flops = {name: value / 1e9 for name, value in benchmarks.pretraining_flops(MatpacConfig()).items()}
    assert flops == {
        "student": pytest.approx(30.2, abs=0.1),
        "teacher": pytest.approx(23.4, abs=0.1),
        "predictor": pytest.approx(31.1, abs=0.1),
        "heads": pytest.approx(7.3, abs=0.1),
    }


def test_script_writes_every_section(tmp_path):
    output = tmp_path / "results.json"
    rows = benchmarks.main(
        ["--size", "tiny", "--steps", "1", "--repeats", "1", "--pipeline_clips", "2", "--output", str(output)]
    )
    results = json.loads(output.read_text())
    assert {row["section"] for row in results["rows"]} == set(benchmarks.SECTIONS)
    assert len(results["rows"]) == len(rows) and all(row["value"] > 0 for row in results["rows"])
    cases = [row["case"] for row in results["rows"] if row["section"] == "pretraining"]
    assert cases[:4] == [
        "tiny, batch 8, fp32",
        "tiny, batch 8, bf16",
        "tiny, batch 8, fp32, MATPAC++",
        "tiny, batch 8, bf16, MATPAC++",
    ]
    cases = [row["case"] for row in results["rows"] if row["section"] == "embedding"]
    assert cases == [
        "tiny, 4 x 30 s, precise, fp32",
        "tiny, 4 x 30 s, precise, bf16",
        "tiny, 4 clips of 30, 21, 11.5, 4.2 s, precise, fp32",
        "tiny, 4 clips of 30, 21, 11.5, 4.2 s, precise, bf16",
    ]
    details = {(row["section"], row["case"]): row["detail"] for row in results["rows"]}
    assert "x MATPAC's" in details["pretraining", "tiny, batch 8, bf16, MATPAC++"]
    # The Trainer end to end, beside the benchmark's step (the same model, batch and precision).
    cases = [row["case"] for row in results["rows"] if row["section"] == "trainer"]
    assert cases == ["tiny, batch 8, fp32", "tiny, batch 8, bf16"]
    assert all("x the benchmark step's rate" in details["trainer", case] for case in cases)


def test_matpac_plus_plus_adds_the_flops_of_four_more_heads():
    matpac = benchmarks.pretraining_flops(MatpacConfig())
    plus_plus = benchmarks.pretraining_flops(MatpacConfig(predictor_num_hypotheses=5))
    # Each extra head: a 512 -> 768 projection of the 133 masked patches, forward and backward.
    head = 3 * 2 * (190 - 57) * 512 * 768
    assert plus_plus["predictor"] - matpac["predictor"] == 4 * head
    assert {name: value for name, value in plus_plus.items() if name != "predictor"} == {
        name: value for name, value in matpac.items() if name != "predictor"
    }


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),  # before: no median of no timing
        (["--workers", "-1"], "argument --workers: must be at least 0, got -1"),
        (["--batch_size", "8.5"], "argument --batch_size: not a whole number: '8.5'"),
    ],
)
def test_bad_arguments_are_refused(arguments, message, capsys):
    with pytest.raises(SystemExit):
        benchmarks.main(arguments)
    assert message in capsys.readouterr().err


def test_embedding_flops_count_the_short_last_chunk_at_its_length():
    config = MatpacConfig()
    one_chunk = benchmarks.embedding_flops(config, 608)
    one_step = 12 * benchmarks.block_flops(1 + 5, 768, 3072) + 2 * 5 * 16**2 * 768
    assert benchmarks.embedding_flops(config, 608 + 16) == one_chunk + one_step
    assert 4 * benchmarks.embedding_flops(config, 2998) / 1e9 == pytest.approx(669.9, abs=0.1)  # 4 x 30 s


def test_step_clock_counts_synchronisations_not_the_debug_modes_own_notice(monkeypatch):
    """On CUDA, entering the sync debug mode warns once that it is a prototype: that notice is not a sync."""
    import warnings
    from types import SimpleNamespace

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(benchmarks, "synchronize", lambda device: None)
    clock = benchmarks.StepClock(warmup=1, device=SimpleNamespace(type="cuda"))
    state = SimpleNamespace(global_step=1, max_steps=3)
    clock.on_step_begin(None, state, None)
    warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing ops")
    for state.global_step in (2, 3):
        warnings.warn(benchmarks.SYNC_WARNING)
        clock.on_step_end(None, state, None)
    assert modes == ["warn", "default"]
    assert clock.syncs == 2 and clock.seconds >= 0


@pytest.mark.parametrize(
    "name, kind",
    [
        ("nvjet_tst_192x192_64x4_1x2_h_bz_coopA_NNT", "products"),
        (
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas",
            "products",
        ),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)",
            "products",
        ),
        ("triton_tem_fused_addmm_7", "products"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t>>()",
            "attention",
        ),
        (
            "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<>::Params)",
            "attention",
        ),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, "
            "at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>>()",
            "foreach (clip, EMA, AdamW)",
        ),
        ("Memcpy HtoD (Pageable -> Device)", "copies"),
        ("Memset (Device)", "copies"),
        ("triton_poi_fused__scaled_dot_product_flash_attention_add_0", "other"),
        ("triton_red_fused__to_copy_native_layer_norm_3", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>()", "other"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, c10::BFloat16, float>()", "other"),
    ],
)
def test_gpu_kernels_are_sorted_by_kind(name, kind):
    assert benchmarks.kernel_kind(name) == kind


def test_gpu_time_counts_overlapping_streams_once_and_names_the_costliest_other_kernels():
    # Two steps (microseconds): a product that overlaps an elementwise kernel on another stream for 100 us.
    kernels = [
        ("nvjet_tst_a", 0.0, 1000.0),
        ("triton_poi_fused_add_0", 900.0, 1300.0),
        ("triton_red_fused_sum_1", 1400.0, 1500.0),
        ("nvjet_tst_a", 2000.0, 3000.0),
        ("triton_poi_fused_add_0", 3000.0, 3400.0),
        ("Memset (Device)", 3400.0, 3410.0),
    ]
    gpu = benchmarks.gpu_time_by_kind(kernels, steps=2, top=1)
    assert gpu["busy_ms"] == pytest.approx((1300 + 100 + 1410) / 1e3 / 2)
    assert gpu["by_kind_ms"] == pytest.approx({"products": 1.0, "other": 0.45, "copies": 0.005})
    assert gpu["costliest_other_ms"] == pytest.approx({"triton_poi_fused_add_0": 0.4})
    # The GPU waited 100 us after the first step's add (the product ended before it) and 500 us after its sum.
    assert gpu["waiting_ms"] == pytest.approx((100 + 500) / 1e3 / 2)
    assert gpu["longest_waits_ms"] == [("triton_red_fused_sum_1", pytest.approx(0.5))]
    detail = benchmarks.format_gpu_time(gpu, step_ms=2.0)
    assert detail.startswith("products 1.0 ms (71 %), other 0.5 ms (32 %), copies 0.0 ms (0 %); GPU idle 0.6 of")
    waits = "0.3 of it between the kernels of steps run back to back (longest: 0.50 ms after triton_red_fused_sum_1)"
    assert waits in detail
    assert detail.endswith("costliest other: triton_poi_fused_add_0 0.4 ms")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_profiled_kernels_of_products_are_products():
    left = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    gpu = benchmarks.gpu_time_by_kind(benchmarks.profiled_kernels(lambda: left @ left, calls=2), steps=2)
    assert gpu["by_kind_ms"]["products"] > 0.9 * gpu["busy_ms"] > 0
