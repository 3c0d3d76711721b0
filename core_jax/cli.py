"""`core-jax <command> [flags]`: train, sample, export, sweep, bench, benchmark.

Each command lives in `core_jax.commands.<name>` with its own absl flags and a `main(argv)`;
only the chosen one is imported, so commands never see each other's flags.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback

COMMANDS = {
    "train": "train a concept (stage 1 embedding, then stage 2 U-Net) from a config",
    "sample": "draw images of a trained concept: core-jax sample --workdir DIR --prompt '...'",
    "export": "write learned_embeds.safetensors, an A1111 embedding and the stage-2 U-Net",
    "sweep": "train many concepts x settings in one compiled program per group",
    "bench": "time the step per regularizer variant (and against PyTorch)",
    "benchmark": "the toy-world method table: train, sample and score CoRe, TI and ablations",
}


def _usage() -> str:
    lines = ["usage: core-jax <command> [--flags]", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    lines += ["", "core-jax <command> --help lists a command's flags."]
    return "\n".join(lines)


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
    try:
        app.run(module.main, argv=[f"core-jax {command}", *flags])
    except (AttributeError, KeyError) as err:
        # ml_collections rejects an unknown --config.x.y key while parsing flags.
        frames = traceback.extract_tb(err.__traceback__)
        if not any("config_flags" in frame.filename for frame in frames):
            raise
        key = re.search(r"(\w+)", str(err))
        hint = re.search(r'Did you mean "(\w+)"', str(err))
        suggestion = f"; did you mean {hint[1]!r}?" if hint else ""
        print(f"core-jax: unknown config key {key[1] if key else err!r}{suggestion}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
