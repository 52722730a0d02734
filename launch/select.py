"""Select the pool examples most like a target task with LESS:
``python launch/select.py --config=configs/NAME.py --config.workdir=DIR [--config.a.b=v ...]``.

Writes ``DIR/selected.jsonl`` (the chosen pool records plus ``less_score``, best first, ready for
``train.objective=sft``). Rerunning resumes: the warmup run from its checkpoints, features per shard.
Exit codes: 0 done, 2 bad config or input.
"""

import os
import sys

# This file shares its name with the standard library's ``select`` (which subprocess, selectors and asyncio
# import): take the script's own directory off the import path before anything imports it.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maxlm.checkpoint import CheckpointMismatchError  # noqa: E402
from maxlm.config import ConfigError, parse_flags_or_exit  # noqa: E402
from maxlm.data.sources import BadRecordError  # noqa: E402
from maxlm.select.features import FeatureDirMismatch  # noqa: E402
from maxlm.select.less import run_selection  # noqa: E402
from maxlm.train.metrics import quiet_library_logs  # noqa: E402

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
