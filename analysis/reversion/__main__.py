"""`python -m analysis.reversion --config=configs/reversion.py:<preset> --workdir=<dir>`."""
from analysis.reversion import study
from analysis.reversion.config import ReversionConfig
from train.cli import run_app

if __name__ == "__main__":
  run_app(study.run, "configs/reversion.py", "Run directory (default runs/<date>-<model>-reversion).",
          typed=ReversionConfig)
