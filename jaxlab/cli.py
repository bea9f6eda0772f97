"""The command line shared by jaxlab's programs: the ``--config`` flag and exit codes.

``--config=FILE[:ARG]`` loads an ml_collections config; ``--config.a.b=VALUE``
overrides any field. ``None`` (spelled so: ``none`` stays a string, as NoPE's
``positional=none`` needs) sets an int, float or string field to None, the meaning
each optional field documents in `jaxlab.train.defaults`.
"""

from __future__ import annotations

import os
from typing import Any

from absl import flags
from ml_collections import config_flags

EXIT_STOPPED = os.EX_TEMPFAIL  # 75: stopped by SIGTERM/SIGINT after a checkpoint; rerun to resume


class _NoneOr(flags.ArgumentParser):
  """``inner``'s parser, with the literal ``None`` parsed as None."""

  def __init__(self, inner: flags.ArgumentParser):
    self.inner = inner

  def parse(self, argument: Any) -> Any:
    if argument is None or argument == "None":
      return None
    return self.inner.parse(argument)

  def flag_type(self) -> str:
    return self.inner.flag_type()


for _type, _parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                       (str, flags.ArgumentParser())):
  config_flags.register_flag_parser_for_type(_type, _NoneOr(_parser))


def define_config_flag(
    flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None
) -> flags.FlagHolder:
  """Defines ``--config`` (required) in ``flag_values``; overrides are read from
  ``sys_argv`` (default: ``sys.argv`` at parse time)."""
  holder = config_flags.DEFINE_config_file(
      "config", None, "Path to an ml_collections config file (experiments/configs/*.py[:ARG]).",
      flag_values=flag_values, sys_argv=sys_argv,
  )
  flags.mark_flag_as_required("config", flag_values=flag_values)
  return holder
