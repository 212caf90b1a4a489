"""Does adversarial negative mining help on matrix inversion? Every strategy x seed, then the report.

    python experiments/matrix_inversion_mining_comparison.py --config configs/studies/quick.yaml
    python experiments/matrix_inversion_mining_comparison.py --config configs/studies/quick.yaml --resume
    python experiments/matrix_inversion_mining_comparison.py --report-only results/quick

The study command itself is diffusion_lib/study/cli.py; copy this file to give a study of your own a script.
"""
import sys

from diffusion_lib.study.cli import main

if __name__ == "__main__":
    sys.exit(main())
