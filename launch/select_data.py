"""Select the pool examples most like a target task with LESS:
``python launch/select_data.py --config=configs/NAME.py --config.workdir=DIR [--config.a.b=v ...]``.

Writes ``DIR/selected.jsonl`` (the chosen pool records plus ``less_score``, best first, ready for
``train.objective=sft``). Rerunning resumes: the warmup run from its checkpoints, features per shard.
Exit codes: 0 done, 2 bad config or input.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from maxlm.checkpoint import CheckpointMismatchError
from maxlm.config import ConfigError, parse_flags_or_exit
from maxlm.data.sources import BadRecordError
from maxlm.select.features import FeatureDirMismatch
from maxlm.select.less import run_selection
from maxlm.train.metrics import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Selection config file (configs/less_*.py).",
                                          lock_config=True)
flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        path = run_selection(_CONFIG.value)
    except (ConfigError, CheckpointMismatchError, BadRecordError, FeatureDirMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"selected: {path}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
