"""`python -m analysis.ioi --config=configs/ioi.py:<preset> --workdir=...`: the IOI study (analysis.ioi.study).

The ConfigDict is converted once into analysis.ioi.config.IoiConfig; a bad field stops the program with one line.
"""
from analysis.ioi.config import IoiConfig
from analysis.ioi.study import run
from train.cli import run_app

if __name__ == "__main__":
  run_app(run, "configs/ioi.py", "Run directory (default runs/<date>-<model>-ioi).", typed=IoiConfig)
