"""`core-jax <command> [flags]`: train, sample, export, sweep, bench, benchmark, methods, score,
dreambench.

Each command lives in `core_jax.commands.<name>` with its own absl flags and a `main(argv)`;
only the chosen one is imported, so commands never see each other's flags.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback
from typing import Any, NoReturn

COMMANDS = {
    "train": "train a concept (stage 1 embedding, then stage 2 U-Net) from a config",
    "sample": "draw images of a trained concept: core-jax sample --workdir DIR --prompt '...'",
    "export": "write learned_embeds.safetensors, an A1111 embedding and the stage-2 U-Net",
    "sweep": "train many concepts x settings in one compiled program per group",
    "bench": "time the step per regularizer variant (and against PyTorch)",
    "benchmark": "the toy-world method table: train, sample and score CoRe, TI and ablations",
    "methods": "list the registered methods: what each trains, its terms, keys and defaults",
    "score": "CLIP-T, CLIP-I and DINO of any image folder against the subject's photos",
    "dreambench": "DreamBench: train every subject x method, sample, score, tabulate",
}


def _usage() -> str:
    lines = ["usage: core-jax <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    lines += ["", "core-jax <command> --help lists a command's flags."]
    return "\n".join(lines)


def _fail(message: str) -> NoReturn:
    print(f"core-jax: {message}", file=sys.stderr)
    sys.exit(2)


def _given(args: list[str], name: str) -> str | None:
    """The value the command line gave flag `name` (its last occurrence)."""
    value = None
    for i, arg in enumerate(args):
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                value = arg[len(prefix):]
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(args):
            value = args[i + 1]
    return value


_KINDS = {
    "int": ("an int", "a whole number"), "float": ("a float", "a number"),
    "bool": ("a bool", "true or false"), "tuple": ("a tuple", "a tuple"),
}


def _example(flag: Any) -> str:
    default = flag.default
    if default is None or default == "" or isinstance(default, (list, tuple)) and not default:
        return ""
    text = repr(tuple(default[:2])) if isinstance(default, (list, tuple)) else str(default)
    quote = "\"" if isinstance(default, (list, tuple)) or " " in text else ""
    return f", e.g. --{flag.name}={quote}{text}{quote}"


def _bad_value(command: str, args: list[str], err: Exception) -> NoReturn:
    """IllegalFlagValueError: 'flag --NAME=VALUE: why' as one line naming key, value and type."""
    from absl import flags

    text = str(err)
    required = re.search(r"Flag --(\S+) must have a value other than None", text)
    if required:
        _fail(f"core-jax {command} needs --{required[1]}; core-jax {command} --help lists its "
              "flags")
    match = re.match(r"flag --([^=\s]+)=", text)
    name = match[1] if match else None
    if name is None or name not in flags.FLAGS:
        _fail(re.sub(r"\s+", " ", text))
    flag = flags.FLAGS[name]
    value = _given(args, name)
    value = text[match.end():].split(": ")[0] if value is None else value
    parser = type(flag.parser).__name__
    kind = flag.parser.flag_type()
    if parser == "ConfigFileFlagParser":
        why = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        _fail(f"cannot load --{name} {value}: {why}")
    if parser == "_ConfigDictParser":
        _fail(f"--{name}={value}: {name.split('.', 1)[-1]} is a group of settings, not one "
              f"value; set its keys one at a time, e.g. --{name}.<key>=<value>")
    if hasattr(flag.parser, "enum_values"):
        choices = ", ".join(map(str, flag.parser.enum_values))
        _fail(f"--{name}={value!r} is not one of {choices}")
    if kind in _KINDS:
        article, wanted = _KINDS[kind]
        if kind == "bool":
            _fail(f"--{name}={value!r} is not a bool; write --{name}=true or --{name}=false")
        _fail(f"--{name}={value!r} is not {article}; write {wanted}{_example(flag)}")
    why = re.sub(r"\s+", " ", text[match.end():].split(": ", 1)[-1]).strip()
    _fail(f"--{name}={value!r} is not a valid {kind} ({why})")


def _check_tuple_overrides() -> None:
    """ml_collections turns any value into a tuple (`--config.sample.prompts=3` gives (3,)):
    an override of a tuple whose elements all have one type must keep that type."""
    from absl import flags

    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if not flag.present or type(flag.parser).__name__ != "TupleParser":
            continue
        default = list(flag.default or ())
        kinds = {type(v) for v in default}
        if len(kinds) != 1 or next(iter(kinds)) not in (str, int, float, bool):
            continue
        (wanted,) = kinds
        accepted = (int, float) if wanted is float else (wanted,)
        values = [v for item in (flag.value or []) for v in
                  (item if isinstance(item, (list, tuple)) else [item])]
        for v in values:
            if not isinstance(v, accepted) or isinstance(v, bool) and wanted is not bool:
                _fail(f"--{name}={_given(sys.argv, name) or tuple(values)!r}: {v!r} is not a "
                      f"{wanted.__name__}; write a tuple of {wanted.__name__}"
                      f"{_example(flag)}")


def _check_config_files(command: str) -> None:
    """A config file that does not exist is reported when first used: check it now."""
    from absl import flags

    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if type(flag.parser).__name__ != "ConfigFileFlagParser" or flag.value is None:
            continue
        error = getattr(flag.value, "_error", None)
        if isinstance(error, Exception):
            path = getattr(flag, "config_filename", None) or flag.serialize()
            missing = "No such file" in str(error) or isinstance(error, FileNotFoundError)
            _fail(f"cannot load --{name} {path}: "
                  + ("no such file" if missing else str(error).splitlines()[0]))


def _config_file_error(args: list[str], err: BaseException) -> NoReturn:
    """An exception raised while a --config file was loaded: its kind, message and line."""
    where = ""
    if isinstance(err, SyntaxError):
        where = f" ({err.filename}, line {err.lineno})"
        message = f"{type(err).__name__}: {err.msg}"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__)
                  if "site-packages" not in f.filename and "/core_jax/" not in f.filename]
        if frames:
            where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    path = _given(args, "config") or "the config"
    _fail(f"cannot load --config {path}: {message}{where}")


def _parse_flags(command: str, args: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one `core-jax: ` line and exit code 2 (absl
    prints 'FATAL Flags parsing error' and exits 1; ml_collections raises tracebacks)."""
    from absl import flags

    try:
        remaining = flags.FLAGS(args)
    except flags.UnrecognizedFlagError as err:
        hint = re.search(r"Did you mean: (.+?) ?\?", str(err))
        suggestion = f" (did you mean --{hint[1].split(',')[0].strip()}?)" if hint else ""
        _fail(f"unknown flag --{err.flagname} for core-jax {command}{suggestion}; "
              f"core-jax {command} --help lists its flags")
    except flags.IllegalFlagValueError as err:
        _bad_value(command, args, err)
    except flags.Error as err:
        missing = re.fullmatch(r"Missing value for flag (-\S+)", str(err))
        if missing:
            _fail(f"{missing[1]} needs a value: write {missing[1]}=<value>")
        _fail(re.sub(r"\s+", " ", str(err)))
    except (AttributeError, KeyError, ValueError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        if not any("config_flags" in frame.filename for frame in frames):
            _config_file_error(args, err)
        if isinstance(err, ValueError):
            # ml_collections: a key path it cannot split (`--config.=3`, `--config.a..b=1`).
            path = re.match(r"Could not parse '(.*?)'", str(err))
            given = next((a for a in args if path and a.startswith("--") and
                          re.match(rf"--\w+\.{re.escape(path[1])}(=|$)", a)), None)
            _fail(f"{given or path[1] if path else err}: not a config key; write "
                  "--config.<section>.<key>=<value>, e.g. --config.stage1.steps=400")
        # ml_collections rejects an unknown --config.x.y key while parsing flags.
        key = re.search(r"(\w+)", str(err))
        hint = re.search(r'Did you mean "(\w+)"', str(err))
        suggestion = f"; did you mean {hint[1]!r}?" if hint else ""
        _fail(f"unknown config key {key[1] if key else err!r}{suggestion}")
    except Exception as err:  # raised by a config file's own code (syntax, names, imports)
        _config_file_error(args, err)
    if len(remaining) > 1:
        _fail(f"unexpected arguments: {' '.join(remaining[1:])} (flags are written --name=value)")
    _check_config_files(command)
    _check_tuple_overrides()
    return remaining


def main(argv: list[str] | None = None) -> None:
    from core_jax import _runtime

    _runtime.configure_process(argv)  # before JAX starts; may re-execute this process once
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in {"-h", "--help", "help"}:
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"core-jax: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    from absl import app

    module = importlib.import_module(f"core_jax.commands.{command}")
    flags = argv[2:]
    if not any(f.startswith(("--verbosity", "-v")) for f in flags):
        flags = ["--verbosity=-1", *flags]  # absl's INFO chatter (Orbax) off unless asked for
    app.run(module.main, argv=[f"core-jax {command}", *flags],
            flags_parser=lambda args: _parse_flags(command, args))


if __name__ == "__main__":
    main()
