"""`python -m analysis.avoid_red --config=configs/avoid_red.py:<preset> --workdir=<dir>`; configs/grid.py presets
run the same study over a larger grid."""
from analysis.avoid_red import study
from analysis.avoid_red.config import AvoidRedConfig
from train.cli import run_app

if __name__ == "__main__":
  run_app(study.run, "configs/avoid_red.py", "Run directory (default runs/<date>-<model>-avoid-red).",
          typed=AvoidRedConfig)
