"""Few-shot diffusion on MNIST: train, evaluate on unseen classes (preset `mnist`).

Run `python experiments/mnist_fewshot.py --help` for every setting.
"""

from fsdm_eqx.experiment import main

if __name__ == "__main__":
    main(default_preset="mnist")
