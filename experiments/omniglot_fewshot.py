"""Few-shot diffusion on Omniglot: train, evaluate on unseen classes (preset `omniglot`).

Run `python experiments/omniglot_fewshot.py --help` for every setting.
"""

from fsdm_eqx.experiment import main

if __name__ == "__main__":
    main(default_preset="omniglot")
