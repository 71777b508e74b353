"""The library's FSDM training step (and one DDIM step) against the same networks in PyTorch.

JAX side: the library's own training step, `make_train_step(fsdm_loss_fn(diffusion), optim)` on
`init_train_state` (as ``test_train_throughput.py``), at the `paper-cifar100` experiment's
diffusion settings (T = 1000 linear, learned-range variance, hybrid loss) and optimiser
settings (AdamW at 1e-4, no clipping, EMA after every step). Torch side: ``torch_fsdm.py``, a
transcription of the same model in plain PyTorch (ViT set encoder with leave-one-out contexts,
Gaussian posterior, the paper's FiLM UNet, the same loss, AdamW and EMA), run in its own
interpreter. The torch parameter counts must equal `count_parameters` of the JAX model for each
of encoder, posterior and denoiser (asserted), so both time the same networks; the first-step
losses of both are printed and recorded (both models start with a zero output layer, so they
are close, but the random weights and draws differ, so they are not compared).

Both take the same batch shape (the same fixed batch, uniform in [-1, 1]) with the same
threads (the cores JAX's CPU backend uses: 2 on the shared benchmark machine) and alternate
round by round: one torch step is the untimed ``setup`` of each JAX round, so a change in machine
load affects both alike. ``ratio`` is JAX's throughput over torch's (> 1: JAX is faster).

- `test_train_step_vs_torch[paper]`: `model_preset("paper-cifar100")` (ViT encoder 6 x 12 heads of
  64, hdim 256, timestep token, variational context; the paper's 23.9M-parameter UNet), 4 sets of
  6 images of 3x32x32 per step on a CPU, 32 sets on a GPU.
- `test_train_step_vs_torch[reduced]`: the same with a UNet of 64 channels, multipliers (1, 2, 2),
  one residual block per level, attention at 16 and 8; a ViT of depth 2, 4 heads of 32, MLP 128,
  hdim 128, patch 8, timestep token; a deterministic FiLM context; 4 sets of 6.
- `test_ddim_step_vs_torch`: one DDIM step (eta = 0, clipped x_0) of the reduced model's
  denoiser over 4 sets of 6 = 24 images, each with a fixed context (its leave-one-out context,
  computed once, outside the timing). JAX times the library's `ddim_sample` on the schedule
  respaced to one step (its first and only step, t = 999), vmapped over the images and jitted:
  one UNet forward and the DDIM update; torch times the same forward and update (``sample``
  mode of ``torch_fsdm.py``).

What differs between the two sides: the library's step also computes its diagnostics (gradient,
parameter and update norms per subtree, the FiLM modulation RMS of every residual block, the
context statistics and the gradient with respect to the contexts, and the guard that skips
non-finite updates); torch computes none of them. Random draws (weights, timesteps, noise,
dropout) differ. XLA compilation is done before any timing.

torch is found in this interpreter, at ``$FSDM_EQX_TORCH_PYTHON``, or at
``/tmp/torchvenv/bin/python`` (`roofline.torch_python`); the tests skip when there is none, and on
a GPU when that torch has no CUDA.

Run: ``python -m pytest benchmarks/test_train_vs_torch.py -o addopts= --benchmark-only -s``.
``FSDM_EQX_BENCH_TINY=1`` shrinks every network, image (16x16) and batch (1 set of 3) so the
whole file runs in a few minutes, records nothing, and only checks that it works end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import warnings
from collections.abc import Generator
from typing import Any, NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import roofline

from fsdm_eqx.config import DiffusionConfig, ModelConfig, OptimConfig, model_preset
from fsdm_eqx.diffusion import ddim_sample, make_schedule
from fsdm_eqx.experiment import PRESETS
from fsdm_eqx.nn import FSDM, count_parameters
from fsdm_eqx.train import fsdm_loss_fn, init_train_state, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_SCRIPT = os.path.join(HERE, "torch_fsdm.py")
TINY = os.environ.get("FSDM_EQX_BENCH_TINY", "") not in ("", "0")
ON_GPU = roofline.ON_GPU
PAPER = PRESETS["paper-cifar100"]
SEED = 0
THREADS = 1 if TINY else len(os.sched_getaffinity(0))
ROUNDS = (
    {"paper": 20, "reduced": 20, "ddim": 20} if ON_GPU else {"paper": 3, "reduced": 5, "ddim": 5}
)
BATCH_SETS = {"paper": 32 if ON_GPU else 4, "reduced": 4, "ddim": 4}
REDUCED = dict(
    unet_model_channels=64,
    unet_channel_mult=(1, 2, 2),
    unet_num_res_blocks=1,
    unet_attention_resolutions=(16, 8),
    encoder_depth=2,
    encoder_heads=4,
    encoder_head_dim=32,
    encoder_mlp_dim=128,
    hdim=128,
    encoder_patch_size=8,
    encoder_time_token=True,
    variational=False,
    learned_variance=True,
)
TINY_SIZES = dict(
    image_size=16,
    unet_model_channels=32,
    unet_channel_mult=(1, 2),
    unet_num_res_blocks=1,
    unet_attention_resolutions=(8,),
    unet_num_heads=2,
    hdim=32,
    encoder_depth=1,
    encoder_heads=2,
    encoder_head_dim=16,
    encoder_mlp_dim=32,
    ns=3,
)
MODEL_FIELDS = (
    "hdim", "encoder_depth", "encoder_heads", "encoder_head_dim", "encoder_mlp_dim",
    "encoder_patch_size", "encoder_time_token", "encoder_dropout", "pooling", "variational",
    "unet_model_channels", "unet_channel_mult", "unet_num_res_blocks",
    "unet_attention_resolutions", "unet_num_heads", "unet_dropout", "learned_variance",
    "image_size", "channels", "ns",
)  # fmt: skip
DIFFUSION_FIELDS = ("num_steps", "schedule", "variance", "loss", "vlb_weight", "sampling_steps",
                    "ddim_eta", "clip_denoised")  # fmt: skip
OPTIM_FIELDS = ("lr", "weight_decay", "b1", "b2", "eps", "grad_clip", "ema_decay", "ema_start",
                "ema_every")  # fmt: skip


class Case(NamedTuple):
    """One configuration: the model, the sets per step and the rounds."""

    name: str
    config: ModelConfig
    batch_sets: int
    rounds: int
    note: str


def case(name: str) -> Case:
    """``paper``, ``reduced`` or ``ddim`` (the reduced model), shrunk under TINY."""
    config = model_preset("paper-cifar100")
    if name in ("reduced", "ddim"):
        config = dataclasses.replace(config, **REDUCED)
    if TINY:
        return Case(name, dataclasses.replace(config, **TINY_SIZES), 1, 2, "TINY sizes")
    sets = BATCH_SETS[name]
    what = "paper-cifar100 networks" if name == "paper" else "reduced networks"
    return Case(name, config, sets, ROUNDS[name], f"{what}, {sets} sets of {config.ns}")


def check_transcribed(model: ModelConfig, optim: OptimConfig) -> None:
    """The settings ``torch_fsdm.py`` transcribes; anything else would not be the same step."""
    assert (model.encoder, model.denoiser, model.conditioning) == ("vit", "unet", "film")
    assert not model.remat
    assert optim.warmup_steps == 0 and optim.lr_schedule == "constant"
    assert optim.lr_multipliers == () and optim.frozen == () and optim.precision == "float32"


def build_model(config: ModelConfig) -> FSDM:
    # One jitted program: much faster than eager initialisation on a CPU.
    return eqx.filter_jit(lambda key: FSDM(config, key=key))(jax.random.key(0))


def fixed_batch(config: ModelConfig, sets: int) -> np.ndarray:
    """The batch both sides train on (``torch_fsdm.py`` draws the same one from the seed)."""
    shape = (sets, config.ns, config.channels, config.image_size, config.image_size)
    return np.random.default_rng(SEED).uniform(-1.0, 1.0, shape).astype(np.float32)


class TorchFSDM:
    """A running ``torch_fsdm.py``: its first JSON line (`info`) and one step per `round`."""

    def __init__(self, process: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.process = process
        self.info = info
        self.times: list[float] = []

    def round(self) -> None:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write("run\n")
        stdin.flush()
        self.times.append(float(stdout.readline()))

    @property
    def label(self) -> str:
        i = self.info
        return f"torch {i['torch']} ({i['device']}, {i['threads']} threads)"

    def median_seconds(self) -> float:
        """Median of the timed rounds (the first round is the warm-up round's)."""
        return statistics.median(self.times[1:])


@contextlib.contextmanager
def torch_fsdm(
    c: Case, mode: str, diffusion: DiffusionConfig, optim: OptimConfig
) -> Generator[TorchFSDM]:
    """Start ``torch_fsdm.py`` on case ``c`` in ``mode`` (skip when torch is absent)."""
    python = roofline.torch_python()
    if python is None:
        pytest.skip("torch is absent (set FSDM_EQX_TORCH_PYTHON to an interpreter that has it)")
    spec: dict[str, Any] = {name: getattr(c.config, name) for name in MODEL_FIELDS}
    spec |= {
        "batch_sets": c.batch_sets,
        "threads": THREADS,
        "mode": mode,
        "seed": SEED,
        "diffusion": {name: getattr(diffusion, name) for name in DIFFUSION_FIELDS},
        "optim": {name: getattr(optim, name) for name in OPTIM_FIELDS},
    }
    process = subprocess.Popen(
        [python, TORCH_SCRIPT, json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"torch_fsdm.py exited ({process.wait()}); see its stderr above.")
        info = json.loads(line)
        if ON_GPU and info["device"] != "cuda":
            pytest.skip("this torch has no CUDA, so it cannot be compared with JAX on the GPU")
        yield TorchFSDM(process, info)
    finally:
        process.stdin.close()
        process.wait(timeout=120)
        process.stdout.close()


def publish(
    benchmark: Any,
    name: str,
    label: str,
    figures: dict[str, Any],
    config: dict[str, Any],
    note: str,
) -> None:
    """`roofline.publish`, except under TINY, whose figures are a check and are not recorded."""
    if TINY:
        benchmark.extra_info.update(figures)
        print(f"\n{label} [TINY, not recorded]: " + json.dumps(figures, default=str))
        return
    roofline.publish(benchmark, name, label, figures, config=config, note=note)


def run_config(c: Case, counts: dict[str, int], torch_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "case": c.name,
        "batch_sets": c.batch_sets,
        "ns": c.config.ns,
        "images_per_step": c.batch_sets * c.config.ns,
        "image_size": c.config.image_size,
        "threads": THREADS,
        "torch_threads": torch_info["threads"],
        "parameters": counts,
        "model": {name: getattr(c.config, name) for name in MODEL_FIELDS},
    }


@pytest.mark.parametrize("name", ["paper", "reduced"])
def test_train_step_vs_torch(benchmark: Any, name: str) -> None:
    c = case(name)
    diffusion, optim = PAPER.diffusion, PAPER.optim
    check_transcribed(c.config, optim)
    model = build_model(c.config)
    counts = count_parameters(model)
    step = make_train_step(fsdm_loss_fn(diffusion), optim, total_steps=10_000)
    state = init_train_state(model, optim, key=jax.random.key(1), total_steps=10_000)
    batch = jnp.asarray(fixed_batch(c.config, c.batch_sets))
    with warnings.catch_warnings():  # the batch is donated too, and no output can reuse it
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        compiled = cast(Any, step).lower(state, batch).compile()
    holder = [state]

    def run() -> dict[str, jax.Array]:
        holder[0], metrics = compiled(holder[0], batch)
        return jax.block_until_ready(metrics)

    jax_loss = float(run()["loss"])  # the first step, before any timing
    with torch_fsdm(c, "train", diffusion, optim) as torch_side:
        assert torch_side.info["parameters"] == counts, (torch_side.info["parameters"], counts)
        benchmark.pedantic(
            run, setup=torch_side.round, rounds=c.rounds, iterations=1, warmup_rounds=1
        )
    torch_loss = float(torch_side.info["loss"])
    assert np.isfinite(jax_loss) and np.isfinite(torch_loss)
    jax_seconds, torch_seconds = benchmark.stats.stats.median, torch_side.median_seconds()
    images = c.batch_sets * c.config.ns
    print(
        f"\ntrain step [{name}] {counts}: JAX {jax_seconds:.3f} s, {torch_side.label} "
        f"{torch_seconds:.3f} s; JAX/torch = {torch_seconds / jax_seconds:.2f}; first-step loss "
        f"JAX {jax_loss:.4f}, torch {torch_loss:.4f}"
    )
    figures: dict[str, Any] = {
        "value": images / jax_seconds,
        "unit": "images/s",
        "torch_images_per_s": images / torch_seconds,
        "ratio": torch_seconds / jax_seconds,
        "ratio_to": torch_side.label,
        "steps_per_s": 1.0 / jax_seconds,
        "step_seconds_median": jax_seconds,
        "torch_step_seconds_median": torch_seconds,
        "first_step_loss": jax_loss,
        "torch_first_step_loss": torch_loss,
    }
    publish(
        benchmark,
        f"train_step_vs_torch/{name}",
        f"train step vs torch [{name}]",
        figures,
        run_config(c, counts, torch_side.info),
        f"{c.note}; JAX/torch, alternating rounds",
    )


def test_ddim_step_vs_torch(benchmark: Any) -> None:
    c = case("ddim")
    diffusion = dataclasses.replace(PAPER.diffusion, sampler="ddim", sampling_steps=1, ddim_eta=0.0)
    check_transcribed(c.config, PAPER.optim)
    model = build_model(c.config)  # a fresh model: its EMA is a copy of it
    counts = count_parameters(model)
    schedule = make_schedule(diffusion.schedule, diffusion.num_steps, sampling_steps=1)
    t = jnp.full((c.config.ns,), schedule.timesteps[0], jnp.float32)
    x_sets = jnp.asarray(fixed_batch(c.config, c.batch_sets))

    @eqx.filter_jit
    def contexts(model: FSDM, x_sets: jax.Array) -> jax.Array:
        def one(x_set: jax.Array) -> jax.Array:
            ti = t if model.time_token else None
            return model.leave_one_out_context(x_set, ti, inference=True).c

        return jax.vmap(one)(x_sets).reshape(-1, c.config.hdim)

    context = contexts(model, x_sets)
    images = c.batch_sets * c.config.ns
    x_T = jax.random.normal(jax.random.key(3), (images, *x_sets.shape[2:]))

    @eqx.filter_jit
    def ddim_step(denoiser: Any, x_T: jax.Array, context: jax.Array) -> jax.Array:
        def one(x: jax.Array, ci: jax.Array) -> jax.Array:
            def model_fn(x_t: jax.Array, tt: jax.Array) -> jax.Array:
                return denoiser(x_t, tt, ci, inference=True).astype(x_t.dtype)

            return ddim_sample(
                model_fn,
                schedule,
                x,
                eta=diffusion.ddim_eta,
                variance=diffusion.variance,
                clip_denoised=diffusion.clip_denoised,
            )

        return jax.vmap(one)(x_T, context)

    compiled = cast(Any, ddim_step).lower(model.denoiser, x_T, context).compile()

    def run() -> jax.Array:
        return jax.block_until_ready(compiled(model.denoiser, x_T, context))

    out = run()
    assert out.shape == x_T.shape and bool(jnp.all(jnp.isfinite(out)))
    with torch_fsdm(c, "sample", diffusion, PAPER.optim) as torch_side:
        assert torch_side.info["parameters"] == counts, (torch_side.info["parameters"], counts)
        benchmark.pedantic(
            run, setup=torch_side.round, rounds=c.rounds, iterations=1, warmup_rounds=1
        )
    jax_seconds, torch_seconds = benchmark.stats.stats.median, torch_side.median_seconds()
    print(
        f"\nDDIM step [{c.name}] {images} images: JAX {jax_seconds * 1e3:.1f} ms, "
        f"{torch_side.label} {torch_seconds * 1e3:.1f} ms; "
        f"JAX/torch = {torch_seconds / jax_seconds:.2f}"
    )
    figures: dict[str, Any] = {
        "value": images / jax_seconds,
        "unit": "images/s",
        "torch_images_per_s": images / torch_seconds,
        "ratio": torch_seconds / jax_seconds,
        "ratio_to": torch_side.label,
        "step_seconds_median": jax_seconds,
        "torch_step_seconds_median": torch_seconds,
        "gflop": roofline.cost_flops(compiled) / 1e9,
    }
    publish(
        benchmark,
        "sampling_vs_torch/ddim_step",
        "DDIM step vs torch",
        figures,
        run_config(c, counts, torch_side.info) | {"sampler": "ddim", "ddim_eta": 0.0},
        f"{c.note}, one DDIM step (UNet forward + update), fixed contexts; JAX/torch, "
        "alternating rounds",
    )
