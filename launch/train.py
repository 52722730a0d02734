"""Train a model: ``python launch/train.py --config=configs/NAME.py --workdir=DIR [--config.a.b=v ...]``.

Rerunning the same command resumes from the latest valid checkpoint in DIR.
Exit codes: 0 done, 2 bad config or input, 42 preempted (checkpoint saved), 43 gave up on divergence.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from maxlm.checkpoint import CheckpointMismatchError
from maxlm.config import ConfigError, parse_flags_or_exit
from maxlm.data.sources import BadRecordError
from maxlm.distributed import process_label
from maxlm.train.guard import DIVERGED_EXIT_CODE, DivergenceError
from maxlm.train.loop import train
from maxlm.train.metrics import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointMismatchError, BadRecordError, FileNotFoundError) as e:
        print(f"error: {process_label()}{e}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as e:
        logging.error("%s%s", process_label(), e)
        sys.exit(DIVERGED_EXIT_CODE)
    except Exception:
        if jax.process_count() > 1:  # which host failed, in the logs every process writes to
            logging.exception("%sfailed", process_label())
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
