"""Train the tiny model with checkpoints; the kill test runs this, kills it and runs it again.

Usage: python tests/resume_script.py RUN_DIR NUM_STEPS SAVE_EVERY [SECONDS_PER_STEP]
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from fsdm_eqx.config import OptimConfig, RunConfig
from fsdm_eqx.instrument import JsonlSink
from fsdm_eqx.train import init_train_state, make_train_step, train
from tests.train_fixtures import TinyModel, tiny_loss


def main() -> None:
    jax.config.update("jax_default_prng_impl", "rbg")
    run_dir, num_steps, save_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    config = RunConfig(
        run_dir=run_dir,
        num_steps=num_steps,
        log_every=5,
        eval_every=0,
        save_every=save_every,
        keep_checkpoints=2,
        progress=False,
    )
    optim = OptimConfig(lr=1e-2, ema_start=0, ema_every=1, ema_decay=0.9)
    key = jax.random.key(config.seed)
    model = TinyModel(jax.random.fold_in(key, 0))
    state = init_train_state(model, optim, key=jax.random.fold_in(key, 1), total_steps=num_steps)
    step_fn = make_train_step(tiny_loss, optim, total_steps=num_steps)

    def batch_fn(step: int) -> np.ndarray:
        time.sleep(delay)
        rng = np.random.default_rng([config.seed, step])
        return rng.normal(size=(8, 5, 4)).astype(np.float32)

    sink = JsonlSink(run_dir)
    train(state, step_fn, batch_fn, config=config, sink=sink, metadata={"script": "resume"})
    sink.close()


if __name__ == "__main__":
    main()
