#!/usr/bin/env python
"""
Throughput of matpac, from the front end to a pre-training step, as a table and a JSON file.

    python benchmarks/run.py                          # ViT-B on this machine's CPU, fp32 and bf16
    python benchmarks/run.py --device cuda --batch_size 256 --dtypes bf16 --compile
    python benchmarks/run.py --size tiny --sections frontend,pretraining

Each pre-training and embedding measurement runs in a fresh process, so that its peak memory is its own. The
pre-training step is measured for MATPAC and for MATPAC++ (5 multiple-choice prediction heads). The `trainer` section
trains MATPAC with `MatpacTrainer` end to end (log-mel cache, DataLoader workers, the scripts' arguments) and reports
its rate against the benchmark's step, the graphs a compiled run compiled and, on CUDA, the host-device
synchronisations of its steps. On CUDA each pre-training row is followed by the step's GPU time by kernel kind
(products, attention, the foreach passes of clipping, EMA and AdamW, and the rest), from a profiler trace.
"""

import argparse
import functools
import json
import logging
import multiprocessing
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_matpac import MatpacConfig, MatpacFeatureExtractor, MatpacForPreTraining, MatpacModel, modeling_matpac  # noqa: E402
from modeling_matpac.audio import resample  # noqa: E402
from modeling_matpac.cpu_memory import keep_freed_memory_mapped  # noqa: E402
from modeling_matpac.feature_extraction_matpac import log_mel_spectrogram  # noqa: E402
from modeling_matpac.pretraining import MatpacPretrainingDataset, generate_builtin_corpus  # noqa: E402
from modeling_matpac.pretraining.data import collate_pretraining_batch  # noqa: E402
from modeling_matpac.pretraining.logmel_cache import MatpacLogMelCacheDataset, preprocess_to_cache  # noqa: E402
from modeling_matpac.pretraining.trainer import MatpacTrainer  # noqa: E402
from run_pretraining import MatpacTrainingArguments  # noqa: E402


logger = logging.getLogger("benchmark")

SIZES = {
    "base": {},
    "small": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        predictor_hidden_size=32,
        predictor_num_hidden_layers=1,
        predictor_num_attention_heads=4,
        predictor_intermediate_size=128,
        head_hidden_size=64,
        head_num_prototypes=128,
    ),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# The pre-training variants: MATPAC and MATPAC++ (the authors' 5 multiple-choice heads).
VARIANTS = {"MATPAC": {}, "MATPAC++": {"predictor_num_hypotheses": 5}}
SECTIONS = ("matmul", "frontend", "resampling", "pipeline", "pretraining", "trainer", "embedding")
# What `torch.cuda.set_sync_debug_mode("warn")` says at each host-device synchronisation.
SYNC_WARNING = "called a synchronizing CUDA operation"
# Trainer steps before the timed ones (compilation, the loader's start); the first of them is logged.
TRAINER_WARMUP_STEPS = 10
# Steps of the pre-training measurement run again under the profiler on CUDA, for its GPU time by kernel kind.
PROFILED_STEPS = 3
# What each kind of library GPU kernel is called; the first pattern that matches wins, so attention comes before the
# products (flash and memory-efficient attention are CUTLASS kernels too).
KERNEL_KINDS = {
    "attention": re.compile(r"flash|fmha|attention|sdpa", re.IGNORECASE),
    "products": re.compile(r"gemm|xmma|nvjet|cutlass|cublas|cudnn", re.IGNORECASE),
    "foreach (clip, EMA, AdamW)": re.compile(r"multi_tensor_apply"),
    "copies": re.compile(r"^mem(cpy|set)", re.IGNORECASE),
}


@dataclass
class Row:
    section: str
    case: str
    value: float
    unit: str
    detail: str = ""


def timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call (the median resists other load on a shared machine)."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_kind(name: str) -> str:
    """
    The kind of a GPU kernel by its name: "other" is elementwise work, reductions, softmax and norms. Kernels that
    Inductor generates are named after the ops they fuse (`triton_poi_fused_..._flash_attention_0` is elementwise):
    its templates (`triton_tem_`) are products, its other kernels "other".
    """
    if name.startswith("triton_"):
        return "products" if name.startswith("triton_tem_") else "other"
    return next((kind for kind, pattern in KERNEL_KINDS.items() if pattern.search(name)), "other")


def profiled_kernels(function, calls: int) -> list[tuple[str, float, float]]:
    """`(name, start, end)` in microseconds of every CUDA kernel and copy that `calls` calls of `function` run."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(calls):
            function()
        torch.cuda.synchronize()
    return [
        (event.name, event.time_range.start, event.time_range.end)
        for event in profile.events()
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    ]


def gpu_time_by_kind(kernels: list[tuple[str, float, float]], steps: int, top: int = 3) -> dict[str, object]:
    """
    Milliseconds per step of the GPU's kernels by `kernel_kind`, the time it was busy (the union of the kernels'
    intervals, as streams may overlap), the costliest "other" kernels, and the time the GPU waited between kernels of
    steps run back to back (as in training) with the longest of those waits and the kernel each followed: where a
    step's time goes beside its products, and where the host fell behind.
    """
    by_kind, others = {}, {}
    for name, start, end in kernels:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + (end - start) / 1e3 / steps
        if kind == "other":
            others[name] = others.get(name, 0.0) + (end - start) / 1e3 / steps
    busy, covered_until, last_name, waits = 0.0, float("-inf"), None, []
    for name, start, end in sorted(kernels, key=lambda kernel: kernel[1]):
        if last_name is not None and start > covered_until:
            waits.append((start - covered_until, last_name))
        busy += max(0.0, end - max(start, covered_until))
        if end > covered_until:
            covered_until, last_name = end, name
    costliest = sorted(others.items(), key=lambda item: -item[1])[:top]
    longest = sorted(waits, key=lambda wait: -wait[0])[:top]
    return {
        "busy_ms": busy / 1e3 / steps,
        "by_kind_ms": by_kind,
        "costliest_other_ms": dict(costliest),
        "waiting_ms": sum(gap for gap, _ in waits) / 1e3 / steps,
        "longest_waits_ms": [(name, gap / 1e3) for gap, name in longest],
    }


def format_gpu_time(gpu: dict[str, object], step_ms: float) -> str:
    """`gpu_time_by_kind` in one table cell, beside the measured step time."""
    busy = gpu["busy_ms"]
    kinds = sorted(gpu["by_kind_ms"].items(), key=lambda item: -item[1])
    parts = ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / busy:.0f} %)" for kind, ms in kinds)
    others = ", ".join(f"{name[:60]} {ms:.1f} ms" for name, ms in gpu["costliest_other_ms"].items())
    waits = ", ".join(f"{ms:.2f} ms after {name[:60]}" for name, ms in gpu["longest_waits_ms"])
    return (
        f"{parts}; GPU idle {max(step_ms - busy, 0.0):.1f} of the {step_ms:.1f} ms step, "
        f"{gpu['waiting_ms']:.1f} of it between the kernels of steps run back to back (longest: {waits or 'none'}); "
        f"costliest other: {others}"
    )


def block_flops(tokens: int, width: int, mlp: int) -> int:
    """Multiply-adds x 2 of one pre-norm block over `tokens` tokens (projections, attention, MLP)."""
    return 2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width


def head_flops(tokens: int, config: MatpacConfig) -> int:
    widths = [config.hidden_size] + [config.head_hidden_size] * (config.head_num_layers - 1)
    widths += [config.head_bottleneck_size, config.head_num_prototypes]
    return 2 * tokens * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def pretraining_flops(config: MatpacConfig) -> dict[str, float]:
    """FLOPs of one training sample, forward and backward (backward = 2 x forward), by part."""
    visible, masked, patches = (
        config.num_visible_patches,
        config.num_patches - config.num_visible_patches,
        config.num_patches,
    )
    width, predictor = config.hidden_size, config.predictor_hidden_size
    student = config.num_hidden_layers * block_flops(visible + 1, width, config.intermediate_size)
    student += 2 * patches * config.patch_size**2 * width
    teacher = config.num_hidden_layers * block_flops(masked + 1, width, config.intermediate_size)
    predictor_forward = config.predictor_num_hidden_layers * block_flops(
        patches + 1, predictor, config.predictor_intermediate_size
    )
    predictor_forward += 2 * (visible + 1) * width * predictor
    predictor_forward += 2 * masked * predictor * width * config.predictor_num_hypotheses
    return {
        "student": 3 * student,
        "teacher": teacher,
        "predictor": 3 * predictor_forward,
        "heads": 4 * head_flops(masked, config),
    }


def embedding_flops(config: MatpacConfig, frames: int) -> int:
    """Forward FLOPs of the precise embeddings of one clip: its chunks, the short last one at its own length."""
    steps = -(-frames // config.patch_size)
    chunk_lengths = [config.num_time_patches] * (steps // config.num_time_patches)
    if steps % config.num_time_patches:
        chunk_lengths.append(steps % config.num_time_patches)
    width = config.hidden_size
    flops = 0
    for length in chunk_lengths:
        patches = config.num_frequency_patches * length
        flops += config.num_hidden_layers * block_flops(patches + 1, width, config.intermediate_size)
        flops += 2 * patches * config.patch_size**2 * width
    return flops


def share_of_ceiling(gflops: float, device: torch.device, dtype: str, repeats: int) -> str:
    """A rate as a share of this machine's matmul ceiling in the same precision (what it could reach at most)."""
    return f"{gflops:.0f} GFLOP/s ({100 * gflops / matmul_gflops(device, dtype, repeats):.0f} % of the matmul ceiling)"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def measure_pretraining(
    config_kwargs: dict, batch_size: int, device: str, dtype: str, steps: int, compile_model: bool
):
    """One process: step time, peak memory and FLOP rate of a full MATPAC update (as `MatpacTrainer` does it)."""
    torch.manual_seed(0)
    device = torch.device(device)
    config = MatpacConfig(**config_kwargs)
    model = MatpacForPreTraining(config).to(device).train()
    optimizer = torch.optim.AdamW(
        [param for param in model.parameters() if param.requires_grad],
        lr=3e-4,
        betas=(0.9, 0.95),
        eps=1e-6,
        weight_decay=0.05,
        fused=True,
    )
    forward = torch.compile(model) if compile_model else model
    values = torch.randn(batch_size, config.num_mel_bins, config.num_frames, device=device)
    state = {"step": 0}

    def step():
        with autocast(device, DTYPES[dtype]):
            outputs = forward(values, step=torch.full((), state["step"], device=device))
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        model.update_teachers_and_center(state["step"], outputs.teacher_sum, outputs.teacher_count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    seconds = timed(step, steps, device)
    flops = sum(pretraining_flops(config).values()) * batch_size
    result = {"seconds": seconds, "memory_gb": peak_memory_gb(device), "gflops": flops / seconds / 1e9}
    if device.type == "cuda":
        # A diagnostic: a profiler that cannot trace the GPU (no CUPTI) must not cost the measurement above.
        try:
            kernels = profiled_kernels(step, PROFILED_STEPS)
        except RuntimeError as error:
            kernels = []
            logger.warning("No GPU time by kernel: the profiler failed (%s).", str(error).strip().splitlines()[0])
        if kernels:
            result["gpu"] = gpu_time_by_kind(kernels, PROFILED_STEPS)
        else:
            logger.warning("No GPU time by kernel: the profiler recorded no CUDA kernel.")
    return result


def measure_embedding(config_kwargs: dict, seconds: tuple[float, ...], device: str, dtype: str, repeats: int):
    """One process: "precise" embeddings of clips of `seconds` in one batch (padded, with its mask, if they differ)."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = MatpacModel(MatpacConfig(**config_kwargs)).to(device).eval()
    extractor = MatpacFeatureExtractor()
    waveforms = [0.1 * torch.randn(int(16000 * clip_seconds)) for clip_seconds in seconds]
    mixed = len(set(seconds)) > 1
    features = extractor(
        waveforms, sampling_rate=16000, return_tensors="pt", return_attention_mask=mixed, device=device
    )

    def embed():
        with torch.inference_mode(), autocast(device, DTYPES[dtype]):
            model(**features)

    seconds = timed(embed, repeats, device)
    return {"seconds": seconds, "memory_gb": peak_memory_gb(device)}


class StepClock(TrainerCallback):
    """
    Times the Trainer's steps after the warm-up, none of them logged, and on CUDA counts the host-device
    synchronisations they make (`torch.cuda.set_sync_debug_mode`).
    """

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.seconds = None
        self.syncs = 0
        self._warnings = warnings.catch_warnings(record=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            synchronize(self.device)
            if self.device.type == "cuda":
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                # Only torch's notice of a synchronising call: entering the mode also warns, once, that it is a
                # prototype ("Synchronization debug mode is ..."), which is not a synchronisation.
                self.syncs = sum(SYNC_WARNING in str(caught.message) for caught in self._caught)
                self._warnings.__exit__(None, None, None)
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.start


def measure_trainer(
    config_kwargs: dict,
    batch_size: int,
    device: str,
    dtype: str,
    steps: int,
    compile_model: bool,
    cache: str,
    workers: int,
):
    """One process: `MatpacTrainer` on a log-mel cache, as `run_pretraining.py --train_cache` trains."""
    device = torch.device(device)
    model = MatpacForPreTraining(MatpacConfig(**config_kwargs))
    clock = StepClock(TRAINER_WARMUP_STEPS, device)
    graphs = torch._dynamo.utils.counters["stats"]
    with tempfile.TemporaryDirectory() as output_dir:
        args = MatpacTrainingArguments(
            output_dir,
            per_device_train_batch_size=batch_size,
            max_steps=TRAINER_WARMUP_STEPS + steps,
            warmup_steps=0,
            # Only the first step logs: a compiled step must not recompile after it, and no timed step logs.
            logging_first_step=True,
            logging_steps=TRAINER_WARMUP_STEPS + steps + 1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            bf16=dtype == "bf16",
            torch_compile=compile_model,
            dataloader_num_workers=workers,
            dataloader_pin_memory=device.type == "cuda",
        )
        dataset = MatpacLogMelCacheDataset(cache, num_frames=model.config.num_frames)
        trainer = MatpacTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collate_pretraining_batch, callbacks=[clock]
        )
        trainer.train()
    return {
        "seconds": clock.seconds / steps,
        "memory_gb": peak_memory_gb(device),
        "graphs": graphs["unique_graphs"],
        "syncs": clock.syncs / steps if device.type == "cuda" else None,
    }


def in_fresh_process(device: torch.device, function, *args):
    """
    `function(*args)` in a new process (not a daemon, so that the trainer's DataLoader can start workers). On CPU the
    process keeps freed memory for the next steps, as `run_pretraining.py` and `run_probe.py` do: with glibc's
    defaults the same step varies by tens of percent from one process to the next with its page faults.
    """
    initializer = keep_freed_memory_mapped if device.type == "cpu" else None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=initializer) as pool:
        return pool.submit(function, *args).result()


def matmul_size(device: torch.device) -> int:
    """
    The ceiling's square product: 2048 on CPU; 8192 on a GPU, where a 2048^3 product takes tens of microseconds,
    so that the host's launch and synchronisation weigh on its timing (four runs on one H100 read 287 to 407
    TFLOP/s in bf16), and does not fill the GPU as the model's largest products do.
    """
    return 8192 if device.type == "cuda" else 2048


def matmul_products(device: torch.device, dtype: str) -> dict[str, object]:
    """
    The `matmul_size` products this machine offers in a precision: torch's matmul and, for fp32 on an x86 CPU,
    oneDNN's, which the model's fp32 linear layers use there (`MatpacLinear`).
    """
    size = matmul_size(device)
    left, right = (torch.randn(size, size, device=device, dtype=DTYPES[dtype] or torch.float32) for _ in range(2))
    products = {"torch.matmul": lambda: left @ right}
    if device.type == "cpu" and dtype == "fp32" and modeling_matpac.ONEDNN_LINEAR:
        products["oneDNN"] = lambda: modeling_matpac.onednn_linear(left, right)
    return products


@functools.cache
def matmul_rates(device: torch.device, dtype: str, repeats: int) -> dict[str, float]:
    """GFLOP/s of each product of `matmul_products` (measured once per run and precision)."""
    return {
        name: 2 * matmul_size(device) ** 3 / timed(product, max(repeats, 5), device) / 1e9
        for name, product in matmul_products(device, dtype).items()
    }


def matmul_gflops(device: torch.device, dtype: str, repeats: int) -> float:
    """This machine's dense matrix ceiling in a precision: its fastest `matmul_size` product."""
    return max(matmul_rates(device, dtype, repeats).values())


def bench_matmul(args, device: torch.device) -> list[Row]:
    rows = []
    for dtype in args.dtypes:
        ceiling = matmul_gflops(device, dtype, args.repeats)
        for name, rate in matmul_rates(device, dtype, args.repeats).items():
            note = "the ceiling" if rate == ceiling else f"{rate / ceiling:.2f} x the ceiling"
            case = f"{matmul_size(device)}^3 matmul, {dtype}, {name}"
            rows.append(Row("matmul", case, rate, "GFLOP/s", note))
    return rows


def bench_frontend(device: torch.device, repeats: int) -> list[Row]:
    extractor = MatpacFeatureExtractor()
    clips = 0.1 * torch.randn(64, 160000)  # 640 s of audio
    audio_seconds = clips.numel() / 16000
    mel_filters, window = extractor.mel_filters.to(device), extractor.window.to(device)
    on_device = clips.to(device)
    batched = timed(lambda: log_mel_spectrogram(on_device, mel_filters, window), repeats, device)
    single = timed(
        lambda: [extractor(clip, sampling_rate=16000, device=device) for clip in clips[:16]], repeats, device
    )
    whole = timed(lambda: extractor(clips, sampling_rate=16000, device=device), repeats, device)
    return [
        Row("frontend", "log-mel, batched (64 x 10 s)", audio_seconds / batched, "x real time"),
        Row("frontend", "feature extractor, batched (64 x 10 s)", audio_seconds / whole, "x real time"),
        Row("frontend", "feature extractor, one clip per call", 16 * 10 / single, "x real time"),
    ]


def bench_resampling(device: torch.device, repeats: int) -> list[Row]:
    rows = []
    for rate in (44100, 22050, 48000):
        audio = 0.1 * torch.randn(8, rate * 10, device=device)
        seconds = timed(lambda: resample(audio, rate, 16000), repeats, device)
        rows.append(Row("resampling", f"{rate} -> 16000 Hz (8 x 10 s)", 80 / seconds, "x real time"))
    return rows


def bench_pipeline(clips: int) -> list[Row]:
    """Crops per second of one DataLoader worker (one thread, as PyTorch sets it): from audio files, from the cache."""
    rows = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as directory:
        files = generate_builtin_corpus(Path(directory) / "audio", num_clips=clips)
        preprocess_to_cache(files, Path(directory) / "cache", num_workers=1)
        detail = f"{clips} wav clips of 6.5-8 s at 16/22.05/44.1 kHz, 608-frame crops"
        torch.set_num_threads(1)
        for case, dataset in (
            ("decode + resample + crop + log-mel", MatpacPretrainingDataset(files, infinite=False)),
            (
                "random crops from the log-mel cache",
                MatpacLogMelCacheDataset(Path(directory) / "cache", infinite=False),
            ),
        ):
            start = time.perf_counter()
            count = sum(1 for _ in dataset)
            rows.append(
                Row("pipeline", f"{case}, per worker", count / (time.perf_counter() - start), "clips/s", detail)
            )
        torch.set_num_threads(threads)
    rows.append(Row("pipeline", "cache speed-up per worker", rows[1].value / rows[0].value, "x"))
    return rows


def bench_pretraining(args, device: torch.device, seconds: dict) -> list[Row]:
    """The step of MATPAC and MATPAC++ per precision; their seconds go into `seconds`, by (variant, dtype)."""
    rows = []
    for variant, variant_kwargs in VARIANTS.items():
        config_kwargs = {**SIZES[args.size], **variant_kwargs}
        for dtype in args.dtypes:
            result = in_fresh_process(
                device,
                measure_pretraining,
                config_kwargs,
                args.batch_size,
                str(device),
                dtype,
                args.steps,
                args.compile,
            )
            seconds[variant, dtype] = result["seconds"]
            detail = (
                f"{result['seconds']:.2f} s/step, peak {result['memory_gb']:.2f} GB, "
                f"{share_of_ceiling(result['gflops'], device, dtype, args.repeats)}"
            )
            if variant != "MATPAC":
                detail += f", step time {seconds[variant, dtype] / seconds['MATPAC', dtype]:.3f} x MATPAC's"
            case = f"{args.size}, batch {args.batch_size}, {dtype}{', compiled' if args.compile else ''}"
            case += f", {variant}" if variant != "MATPAC" else ""
            rows.append(Row("pretraining", case, args.batch_size / result["seconds"], "samples/s", detail))
            if "gpu" in result:
                gpu, detail = result["gpu"], format_gpu_time(result["gpu"], 1e3 * result["seconds"])
                rows.append(Row("pretraining", f"{case}: GPU time by kernel", gpu["busy_ms"], "ms/step", detail))
    for variant, variant_kwargs in VARIANTS.items():
        flops = pretraining_flops(MatpacConfig(**SIZES[args.size], **variant_kwargs))
        parts = ", ".join(f"{name} {value / 1e9:.1f}" for name, value in flops.items())
        case = f"FLOP count per sample ({args.size}{', ' + variant if variant != 'MATPAC' else ''})"
        rows.append(Row("pretraining", case, sum(flops.values()) / 1e9, "GFLOP", parts))
    return rows


def bench_trainer(args, device: torch.device, step_seconds: dict) -> list[Row]:
    """The Trainer's rate, beside the benchmark step's (`step_seconds`) when the pretraining section ran first."""
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        files = generate_builtin_corpus(Path(directory) / "audio", num_clips=args.trainer_clips)
        preprocess_to_cache(files, Path(directory) / "cache", num_workers=1)
        for dtype in args.dtypes:
            result = in_fresh_process(
                device,
                measure_trainer,
                SIZES[args.size],
                args.batch_size,
                str(device),
                dtype,
                args.steps,
                args.compile,
                str(Path(directory) / "cache"),
                args.workers,
            )
            workers = f"{args.workers} DataLoader worker{'s' if args.workers != 1 else ''}"
            detail = f"{result['seconds']:.2f} s/step, peak {result['memory_gb']:.2f} GB, {workers}"
            if args.compile:
                detail += f", {result['graphs']} graph(s) compiled"
            if result["syncs"] is not None:
                detail += f", {result['syncs']:g} host-device syncs per step"
            if ("MATPAC", dtype) in step_seconds:
                detail += f", {step_seconds['MATPAC', dtype] / result['seconds']:.2f} x the benchmark step's rate"
            case = f"{args.size}, batch {args.batch_size}, {dtype}{', compiled' if args.compile else ''}"
            rows.append(Row("trainer", case, args.batch_size / result["seconds"], "samples/s", detail))
    return rows


# Equal lengths, and a padded batch of mixed lengths (the side-by-side comparison's two cases).
EMBEDDING_BATCHES = {"4 x 30 s": (30.0,) * 4, "4 clips of 30, 21, 11.5, 4.2 s": (30.0, 21.0, 11.5, 4.2)}


def bench_embedding(args, device: torch.device) -> list[Row]:
    rows = []
    extractor = MatpacFeatureExtractor()
    config = MatpacConfig(**SIZES[args.size])
    for label, seconds in EMBEDDING_BATCHES.items():
        frames = [
            1 + (int(16000 * clip_seconds) - extractor.n_fft) // extractor.hop_length for clip_seconds in seconds
        ]
        flops = sum(embedding_flops(config, clip_frames) for clip_frames in frames)
        for dtype in args.dtypes:
            result = in_fresh_process(
                device, measure_embedding, SIZES[args.size], seconds, str(device), dtype, args.repeats
            )
            rate = share_of_ceiling(flops / result["seconds"] / 1e9, device, dtype, args.repeats)
            rows.append(
                Row(
                    "embedding",
                    f"{args.size}, {label}, precise, {dtype}",
                    sum(seconds) / result["seconds"],
                    "s audio / s",
                    f"{result['seconds']:.2f} s, peak {result['memory_gb']:.2f} GB, {rate}",
                )
            )
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| section | case | value | unit | detail |", "| --- | --- | ---: | --- | --- |"]
    lines += [f"| {r.section} | {r.case} | {r.value:,.2f} | {r.unit} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def count(minimum: int):
    """An argparse type: a whole number of at least `minimum` (a timing of 0 steps has no median)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="base", help="Model size (base = the published ViT-B).")
    parser.add_argument("--batch_size", type=count(1), default=8, help="Pre-training batch size.")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where to measure (default: cuda when there is a GPU, else cpu).",
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="Comma-separated: fp32, bf16 (autocast).")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {SECTIONS}.")
    parser.add_argument("--steps", type=count(1), default=5, help="Timed pre-training steps (after one warm-up step).")
    parser.add_argument("--repeats", type=count(1), default=3, help="Timed repeats of the other measurements.")
    parser.add_argument(
        "--pipeline_clips", type=count(1), default=16, help="Audio files decoded by the pipeline test."
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the pre-training model.")
    parser.add_argument(
        "--workers",
        type=count(0),
        default=None,
        help="DataLoader workers of the trainer section (8 on CUDA, 1 on CPU).",
    )
    parser.add_argument(
        "--trainer_clips", type=count(1), default=32, help="Clips in the trainer section's log-mel cache."
    )
    parser.add_argument(
        "--output",
        default=str(Path(__file__).parent / "results.json"),
        help="Where the JSON results go (default: results.json beside this script).",
    )
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    sections = args.sections.split(",")
    for name in args.dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {SECTIONS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    if args.workers is None:
        args.workers = 8 if args.device.startswith("cuda") else 1
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    device = torch.device(args.device)
    step_seconds = {}  # the pretraining section's, for the trainer section's ratio

    runners = {
        "matmul": lambda: bench_matmul(args, device),
        "frontend": lambda: bench_frontend(device, args.repeats),
        "resampling": lambda: bench_resampling(device, args.repeats),
        "pipeline": lambda: bench_pipeline(args.pipeline_clips),
        "pretraining": lambda: bench_pretraining(args, device, step_seconds),
        "trainer": lambda: bench_trainer(args, device, step_seconds),
        "embedding": lambda: bench_embedding(args, device),
    }
    rows = []
    for name in sections:
        logger.info("Measuring %s ...", name)
        rows += runners[name]()
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"\nmatpac benchmarks on {machine} (torch {torch.__version__})\n")
    print(format_table(rows))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "machine": machine,
                "torch": torch.__version__,
                "arguments": vars(args),
                "rows": [r.__dict__ for r in rows],
            },
            indent=2,
        )
    )
    return rows


if __name__ == "__main__":
    main()
