"""Few-shot diffusion on CIFAR-100: train, evaluate on unseen classes (preset `paper-cifar100`).

Run `python experiments/cifar_fewshot.py --help` for every setting.
"""

from fsdm_eqx.experiment import main

if __name__ == "__main__":
    main(default_preset="paper-cifar100")
