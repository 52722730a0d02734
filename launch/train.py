"""Train a model: ``python launch/train.py --config=configs/NAME.py --workdir=DIR [--config.a.b=v ...]``.

Rerunning the same command resumes from the latest checkpoint in DIR.
"""

from absl import app, flags
from ml_collections import config_flags

from maxlm.config import parse_flags_or_exit
from maxlm.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
