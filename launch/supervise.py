r"""Restart a training command after crashes: thin wrapper over maxlm.train.supervisor.

  python launch/supervise.py --workdir=DIR --max_restarts=10 --backoff_s=5 \
      --max_backoff_s=300 -- python launch/train.py --config=... --workdir=DIR

Everything after `--` is the child command. Exits 0 when the child finishes, and with
the child's status when it was preempted (42), gave up on divergence (43) or kept
crashing. Events go to DIR/events.jsonl.
"""

from absl import app, flags

from maxlm.train.supervisor import supervise

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; events go to DIR/events.jsonl.", required=True
)
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "Restarts before giving up.")
_BACKOFF_S = flags.DEFINE_float("backoff_s", 5.0, "First back-off; doubles after each restart.")
_MAX_BACKOFF_S = flags.DEFINE_float("max_backoff_s", 300.0, "Cap on the back-off.")
_RESTART_ON_PREEMPTION = flags.DEFINE_bool(
    "restart_on_preemption", False, "Also restart a child that saved and stopped on SIGTERM."
)


def main(argv: list[str]) -> int:
    command = argv[1:]
    if not command:
        raise app.UsageError("give the command to supervise after `--`")
    return supervise(
        command,
        _WORKDIR.value,
        max_restarts=_MAX_RESTARTS.value,
        backoff_s=_BACKOFF_S.value,
        max_backoff_s=_MAX_BACKOFF_S.value,
        restart_on_preemption=_RESTART_ON_PREEMPTION.value,
    )


if __name__ == "__main__":
    app.run(main)
