"""Running a command: config mistakes end in one line on stderr, not a traceback.

`run(main)` is `absl.app.run(main)` with two differences: a `--config.x=...` override of a field
the config does not have (or of the wrong type) and a `config_checks.ConfigError` raised by
`main` print `error: <one line naming the field and the fix>` and exit with status 2.
"""

import sys

from absl import app
from absl import flags

from detr_jax import config_checks

EXIT_CONFIG_ERROR = 2


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(EXIT_CONFIG_ERROR)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _overrides(argv: list[str]) -> list[str]:
  names = []
  for arg in argv:
    if arg.startswith("--config."):
      names.append(arg[len("--config."):].split("=", 1)[0])
  return names


def explain_override_error(argv: list[str], error: Exception) -> str:
  """One line saying which `--config.x` override is wrong and what to write instead."""
  path = _config_path(argv)
  config = None
  if path:
    try:
      config = config_checks.load_config(path)
    except Exception:  # pylint: disable=broad-except
      config = None
  if config is not None:
    file = path.partition(":")[0]
    present = set(config_checks.flatten(config))
    known = present | config_checks.reference_fields()
    for name in _overrides(argv):
      if name not in present and not any(p.startswith(name + ".") for p in present):
        return (f"--config.{name}: the config {file} has no field {name}."
                f"{config_checks.suggest(name, known)}")
  text = str(error).strip().strip("'\"").replace("\\n", " ").replace("\\'", "'")
  return f"bad --config override ({type(error).__name__}: {text})"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (see --helpfull)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(explain_override_error(argv, e))
  return []


def run(main) -> None:
  """`app.run(main)`, with config errors as one line (see the module docstring)."""

  def checked_main(argv):
    try:
      return main(argv)
    except config_checks.ConfigError as e:
      _fail(str(e))

  app.run(checked_main, flags_parser=_parse_flags)
