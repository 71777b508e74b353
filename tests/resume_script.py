"""Train the tiny model with checkpoints; the kill test runs this, kills it and runs it again.

Usage: python tests/resume_script.py RUN_DIR NUM_STEPS SAVE_EVERY [SECONDS_PER_STEP]
"""

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from fsdm_eqx.config import RunConfig
from fsdm_eqx.instrument import JsonlSink
from fsdm_eqx.train import train
from tests.train_fixtures import fresh_state, loop_batch, make_tiny_step


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
    state = fresh_state(total_steps=num_steps)
    step_fn = make_tiny_step(total_steps=num_steps)

    def batch_fn(step: int) -> np.ndarray:
        time.sleep(delay)
        return loop_batch(step)

    sink = JsonlSink(run_dir)
    train(state, step_fn, batch_fn, config=config, sink=sink, metadata={"script": "resume"})
    sink.close()


if __name__ == "__main__":
    main()
