"""Throughput of the FID InceptionV3 (images/s at 299x299), against torch and a dense matmul.

`test_inception_throughput` times the jitted JAX network with pytest-benchmark and reports its
FLOP/s (XLA's cost analysis of the compiled network, checked against the convolutions' count from
the architecture table) as a fraction of a dense float32 matmul timed between its rounds (the
practical roofline), and on a known GPU as MFU against the device's peak.
`test_inception_vs_torch` times the same network built in torch from the same weights on the same
input batch in a separate interpreter, checks that both give the same features, and reports the
ratio. torch is found in this interpreter, at ``$FSDM_EQX_TORCH_PYTHON``, or at
``/tmp/torchvenv/bin/python``; the test skips when there is none (torch is never a dependency).

Both time the network only (a preprocessed float batch); the resize is a small fraction of the cost.
Sizes: batch 8 on CPU, 128 on GPU. Weights: the shared npz where present, else random weights of the
same shapes (throughput does not depend on their values).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import roofline

from fsdm_eqx.metrics import load_inception
from fsdm_eqx.metrics.inception import ARCHITECTURE, expected_shapes

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_WEIGHTS = os.path.join(
    HERE, "..", "..", "shared", "weights", "fid_inception_v3_2015-12-05_nofc_pytorchfid_names.npz"
)
ON_GPU = jax.default_backend() == "gpu"
BATCH = 128 if ON_GPU else 8
ROUNDS = 10 if ON_GPU else 3
MATMUL_N = 8192 if ON_GPU else 2048


def conv_flops_per_image() -> int:
    """Multiply-adds x 2 of every convolution at 299x299, from the architecture table."""
    size_in = {  # spatial size entering each block, from the network's strides and pools
        "Conv2d_1a": 299, "Conv2d_2a": 149, "Conv2d_2b": 147, "Conv2d_3b": 73, "Conv2d_4a": 73,
        "Mixed_5": 35, "Mixed_6a": 35, "Mixed_6": 17, "Mixed_7a": 17, "Mixed_7": 8,
    }  # fmt: skip
    flops = 0
    for name, cin, cout, (kh, kw), stride, (ph, pw) in ARCHITECTURE:
        key = next(k for k in sorted(size_in, key=len, reverse=True) if name.startswith(k))
        n = size_in[key]
        h = (n + 2 * ph - kh) // stride + 1
        w = (n + 2 * pw - kw) // stride + 1
        flops += 2 * cin * cout * kh * kw * h * w
    return flops


def _weights_path(tmp_dir: str) -> str:
    if os.path.exists(SHARED_WEIGHTS):
        return SHARED_WEIGHTS
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in expected_shapes().items():
        if key.endswith("running_var") or key.endswith("bn.weight"):
            arrays[key] = np.ones(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else 1
            arrays[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    path = os.path.join(tmp_dir, "random_inception.npz")
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = str(tmp_path_factory.mktemp("inception_bench"))
    path = _weights_path(tmp)
    model = load_inception(path)
    rng = np.random.default_rng(1)
    x_np = rng.uniform(-1, 1, (BATCH, 3, 299, 299)).astype(np.float32)
    x = jnp.asarray(x_np)
    network = jax.jit(lambda m, x: jax.vmap(m)(x)).lower(model, x).compile()
    return {"tmp": tmp, "weights": path, "model": model, "x_np": x_np, "x": x, "net": network}


def test_inception_throughput(benchmark: Any, setup: dict[str, Any]) -> None:
    model, compiled, x = setup["model"], setup["net"], setup["x"]
    xla_flops = roofline.cost_flops(compiled)
    conv_flops = BATCH * conv_flops_per_image()
    # XLA counts the convolutions (without the products with zero padding, which the table's
    # count includes) plus the batch norms, activations and pools around them.
    assert 0.9 * conv_flops < xla_flops < 1.1 * conv_flops, (xla_flops, conv_flops)
    matmul = roofline.MatmulRoofline("float32", n=MATMUL_N)
    benchmark.pedantic(
        lambda: compiled(model, x).block_until_ready(),
        setup=matmul.sample,
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )
    seconds = benchmark.stats.stats.median
    figures: dict[str, Any] = {
        "value": BATCH / seconds,
        "unit": "images/s",
        "conv_gflop_per_image": conv_flops / BATCH / 1e9,
        **roofline.roofline_figures(xla_flops, seconds, matmul.flop_per_s, "float32"),
    }
    config = {"batch": BATCH, "image_size": 299, "weights": os.path.basename(setup["weights"])}
    roofline.publish(
        benchmark,
        "fid_features/inception",
        f"JAX Inception ({jax.default_backend()})",
        figures,
        config=config,
        note=f"299x299, batch {BATCH}",
    )
    assert figures["value"] > 0 and 0 < figures["ratio_to_matmul"] < 2


# --------------------------------------------------------------------------- torch side

# pytorch-fid's FID Inception in plain torch, built from an npz (argv[1]) and the architecture
# table as JSON (argv[2]); defines `net` and `dev`. The tests reuse it for end-to-end checks.
TORCH_NET = r'''
import json, sys, time
import numpy as np, torch
import torch.nn as nn
import torch.nn.functional as F

weights_path, arch_path = sys.argv[1], sys.argv[2]
w = np.load(weights_path)
arch = json.load(open(arch_path))
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def conv_bn(name, cin, cout, k, stride, pad):
    conv = nn.Conv2d(cin, cout, tuple(k), stride=stride, padding=tuple(pad), bias=False)
    bn = nn.BatchNorm2d(cout, eps=1e-3)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w[name + ".conv.weight"]))
        bn.weight.copy_(torch.from_numpy(w[name + ".bn.weight"]))
        bn.bias.copy_(torch.from_numpy(w[name + ".bn.bias"]))
        bn.running_mean.copy_(torch.from_numpy(w[name + ".bn.running_mean"]))
        bn.running_var.copy_(torch.from_numpy(w[name + ".bn.running_var"]))
    return nn.Sequential(conv, bn, nn.ReLU(inplace=True))


class Net(nn.Module):
    """pytorch-fid's FIDInceptionV3 up to pool3 (FIDInceptionA/C/E_1/E_2 pooling)."""

    def __init__(self):
        super().__init__()
        self.c = nn.ModuleDict({n.replace(".", "__"): conv_bn(n, *rest) for n, *rest in arch})

    def f(self, name, x):
        return self.c[name.replace(".", "__")](x)

    def avg(self, x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    def block_a(self, b, x):
        f = lambda n, y: self.f(f"{b}.{n}", y)
        return torch.cat([
            f("branch1x1", x),
            f("branch5x5_2", f("branch5x5_1", x)),
            f("branch3x3dbl_3", f("branch3x3dbl_2", f("branch3x3dbl_1", x))),
            f("branch_pool", self.avg(x)),
        ], 1)

    def block_b(self, b, x):
        f = lambda n, y: self.f(f"{b}.{n}", y)
        return torch.cat([
            f("branch3x3", x),
            f("branch3x3dbl_3", f("branch3x3dbl_2", f("branch3x3dbl_1", x))),
            F.max_pool2d(x, 3, 2),
        ], 1)

    def block_c(self, b, x):
        f = lambda n, y: self.f(f"{b}.{n}", y)
        d = x
        for i in range(1, 6):
            d = f(f"branch7x7dbl_{i}", d)
        return torch.cat([
            f("branch1x1", x),
            f("branch7x7_3", f("branch7x7_2", f("branch7x7_1", x))),
            d,
            f("branch_pool", self.avg(x)),
        ], 1)

    def block_d(self, b, x):
        f = lambda n, y: self.f(f"{b}.{n}", y)
        d = x
        for i in range(1, 5):
            d = f(f"branch7x7x3_{i}", d)
        return torch.cat([f("branch3x3_2", f("branch3x3_1", x)), d, F.max_pool2d(x, 3, 2)], 1)

    def block_e(self, b, x, max_pool):
        f = lambda n, y: self.f(f"{b}.{n}", y)
        a = f("branch3x3_1", x)
        d = f("branch3x3dbl_2", f("branch3x3dbl_1", x))
        pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else self.avg(x)
        return torch.cat([
            f("branch1x1", x),
            torch.cat([f("branch3x3_2a", a), f("branch3x3_2b", a)], 1),
            torch.cat([f("branch3x3dbl_3a", d), f("branch3x3dbl_3b", d)], 1),
            f("branch_pool", pooled),
        ], 1)

    def forward(self, x):
        x = self.f("Conv2d_2b_3x3", self.f("Conv2d_2a_3x3", self.f("Conv2d_1a_3x3", x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.f("Conv2d_4a_3x3", self.f("Conv2d_3b_1x1", x)), 3, 2)
        for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = self.block_a(b, x)
        x = self.block_b("Mixed_6a", x)
        for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = self.block_c(b, x)
        x = self.block_d("Mixed_7a", x)
        x = self.block_e("Mixed_7b", x, False)
        x = self.block_e("Mixed_7c", x, True)
        return x.mean((2, 3))


net = Net().eval().to(dev)
'''

_TORCH_BENCH = r"""
x_path = sys.argv[3]
x = torch.from_numpy(np.load(x_path)).to(dev)


def run():
    with torch.inference_mode():
        out = net(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out


feats = run().cpu().numpy()
np.save(x_path + ".torch_features.npy", feats)
print(json.dumps({"device": dev.type, "threads": torch.get_num_threads(),
                  "torch": torch.__version__}), flush=True)
# One timed forward per line read, so the caller can interleave these with its own rounds.
for line in sys.stdin:
    if line.strip() != "run":
        break
    t0 = time.perf_counter()
    run()
    print(time.perf_counter() - t0, flush=True)
"""
_TORCH_SCRIPT = TORCH_NET + _TORCH_BENCH


def test_inception_vs_torch(benchmark: Any, setup: dict[str, Any]) -> None:
    python = roofline.torch_python()
    if python is None:
        pytest.skip("torch is absent (set FSDM_EQX_TORCH_PYTHON to an interpreter that has it)")
    tmp = setup["tmp"]
    x_path = os.path.join(tmp, "x.npy")
    np.save(x_path, setup["x_np"])
    arch_path = os.path.join(tmp, "arch.json")
    with open(arch_path, "w") as f:
        json.dump(ARCHITECTURE, f)
    proc = subprocess.Popen(
        [python, "-c", _TORCH_SCRIPT, setup["weights"], arch_path, x_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        info = json.loads(stdout.readline())
        if ON_GPU and info["device"] != "cuda":
            pytest.skip("this torch has no CUDA, so it cannot be compared with JAX on the GPU")
        torch_times: list[float] = []

        def torch_round() -> None:
            stdin.write("run\n")
            stdin.flush()
            torch_times.append(float(stdout.readline()))

        # One torch forward before each JAX round (untimed setup): the two alternate, so a change
        # in machine load affects both alike.
        model, run, x = setup["model"], setup["net"], setup["x"]
        benchmark.pedantic(
            lambda: run(model, x).block_until_ready(),
            setup=torch_round,
            rounds=ROUNDS,
            iterations=1,
            warmup_rounds=1,
        )
    finally:
        stdin.close()
        proc.wait(timeout=60)
        stdout.close()
    jax_ips = BATCH / benchmark.stats.stats.median
    torch_ips = BATCH / float(np.median(torch_times[1:]))
    torch_feats = np.load(x_path + ".torch_features.npy")
    jax_feats = np.asarray(setup["net"](setup["model"], setup["x"]))
    rel = float(np.max(np.abs(jax_feats - torch_feats)) / np.max(np.abs(torch_feats)))
    print(
        f"\nInception batch {BATCH} on {jax.default_backend()}: JAX {jax_ips:.2f} images/s, "
        f"torch {info['torch']} ({info['device']}, {info['threads']} threads) "
        f"{torch_ips:.2f} images/s; JAX/torch = {jax_ips / torch_ips:.2f}; "
        f"features agree to {rel:.1e} (max abs error / max |feature|)"
    )
    figures = {
        "value": jax_ips,
        "unit": "images/s",
        "torch_images_per_s": torch_ips,
        "ratio": jax_ips / torch_ips,
        "ratio_to": f"torch {info['torch']} ({info['device']}, {info['threads']} threads)",
        "max_feature_error_relative": rel,
    }
    benchmark.extra_info.update(figures)
    roofline.record(
        "fid_features/inception_vs_torch",
        figures,
        config={"batch": BATCH, "image_size": 299},
        note=f"299x299, batch {BATCH}; JAX/torch, alternating rounds",
    )
    assert rel < 1e-4
