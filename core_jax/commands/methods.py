"""core-jax methods: the registered methods, what each trains, its config keys and defaults."""

from __future__ import annotations

from absl import flags

_NAME = flags.DEFINE_string("method", None, "show only this method")


def describe(name: str | None = None) -> str:
    """The registry as text: per method its summary, trained groups, terms (with their weight
    keys), per-run numbers, hooks, config keys with defaults, and source."""
    from core_jax.methods import METHODS, Settings, get_method

    chosen = [get_method(name)] if name else sorted(METHODS.values(), key=lambda m: m.name)
    blocks = []
    for method in chosen:
        settings = Settings(dict(method.defaults))
        terms = [f"{t.name} (x {t.weight or '1'})" for t in method.terms(settings)]
        hooks = [h.name for h in method.hooks(settings)]
        rows = [
            f"{method.name}: {method.summary}",
            f"  trains:   {', '.join(f'{g} (lr: {k})' for g, k in method.trains.items()) or '-'}",
            f"  terms:    {', '.join(terms) or '-'}",
            f"  per run:  {', '.join((*method.numbers, *method.run_texts)) or '-'}",
            f"  hooks:    {', '.join(hooks) or '-'}",
            "  keys:     " + (", ".join(f"{k}={v!r}" for k, v in method.defaults.items()) or "-"),
        ]
        if method.source:
            rows.append(f"  source:   {method.source}")
        blocks.append("\n".join(rows))
    usage = ("A stage lists the methods it combines, e.g. "
             "--config.stage1.methods=\"('textual_inversion', 'core')\"; their keys live in that "
             "stage's config (stage1.lambda_emb, ...).")
    return "\n\n".join(blocks + [usage])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors

    print(run_reporting_input_errors(describe, _NAME.value))
