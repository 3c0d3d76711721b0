#!/usr/bin/env bash
# The accelerator check of issue 17, one script, under ten minutes on one GPU: the sd15-shape
# bench (random weights) in bf16 and fp32, and CoRe with C = 1, 4, 8 concepts packed, gathered
# into one JSON file with the issue's goals checked against it.
#
#   bash launch/gpu_check.sh                   # writes $OUT/gpu_check.json, else ./gpu_check.json
#   bash launch/gpu_check.sh --out results/h200.json
#   bash launch/gpu_check.sh --dry-run         # prints the commands, runs nothing
#   bash launch/gpu_check.sh --config configs/bench_tiny.py --steps 1   # the plumbing, on CPU
# PYTHON names the interpreter (default: ./.venv/bin/python, else python3).
#
# What runs, in order of importance (a later part is cut, not an earlier one, when the time
# budget, --budget seconds (default 570), runs out; each command's results are kept as they come):
#   1. bf16: TI and CoRe stage-1 steps, stage 2 (the U-Net fine-tune, the "unet" variant) at
#      batch 6, and one 50-step guided DDIM chain;
#   2. bf16: CoRe with C = 1, 4, 8 concepts packed, 1 row each (cost per concept);
#   3. fp32: the same as 1.
# Compiling dominates on a GPU (about ten programs of SD 1.5's size); the persistent compile
# cache (--compile_cache, default ~/.cache/core-jax/xla) makes a rerun on the same machine fast.
#
# The JSON: {"environment": ..., "parts": [{"name", "command", "exit_code", "seconds",
# "results": [one bench Result each], "stderr_tail"}], "goals": {...}}. Goals (issue 17), judged
# from the results: CoRe bf16 batch 6 MFU >= 40 % on H100/H200; 300 CoRe steps + compile under
# a minute; C = 8 at <= 0.6x the per-concept cost of C = 1.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:+$OUT/gpu_check.json}"
out="${out:-gpu_check.json}"
config=configs/bench_sd15.py
steps=5
budget=570
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a path}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --config) config="${2:?--config needs a file}"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --steps) steps="${2:?--steps needs a number}"; shift 2 ;;
    --steps=*) steps="${1#--steps=}"; shift ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    --budget=*) budget="${1#--budget=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$steps$budget" in
  *[!0-9]*) echo "gpu_check.sh: --steps and --budget take whole numbers" >&2; exit 2 ;;
esac
[ -f "$config" ] || { echo "gpu_check.sh: no config file $config" >&2; exit 2; }

python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && python=.venv/bin/python
bench=("$python" -m core_jax bench --config "$config" --json "--config.steps=$steps"
       --config.warmup=1)
suite=(--variants ti,core,unet,sample --config.batch=6 --config.sample.chains=1)
scaling=(--variants= --scaling --config.scaling.concepts=1,4,8 "--config.scaling.steps=$steps")
names=(bf16_suite bf16_scaling fp32_suite)
commands=(
  "${bench[*]} ${suite[*]} --config.dtype=bfloat16"
  "${bench[*]} ${scaling[*]} --config.dtype=bfloat16"
  "${bench[*]} ${suite[*]} --config.dtype=float32"
)

if [ "$dry_run" = 1 ]; then
  echo "would write $out"
  for i in "${!names[@]}"; do echo "${names[$i]}: ${commands[$i]}"; done
  exit 0
fi

parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
deadline=$((SECONDS + budget))
for i in "${!names[@]}"; do
  left=$((deadline - SECONDS))
  name=${names[$i]}
  echo "$name" > "$parts/$i.name"
  echo "${commands[$i]}" > "$parts/$i.command"
  if [ "$left" -le 10 ]; then
    echo "gpu_check.sh: no time left for $name" | tee "$parts/$i.stderr" >&2
    echo skipped > "$parts/$i.code"
    continue
  fi
  echo "gpu_check.sh: $name (${left} s left): ${commands[$i]}" >&2
  start=$SECONDS
  # word splitting of the command is intended: every piece is a plain flag
  # shellcheck disable=SC2086
  timeout "$left" ${commands[$i]} > "$parts/$i.jsonl" 2> "$parts/$i.stderr"
  echo $? > "$parts/$i.code"
  echo $((SECONDS - start)) > "$parts/$i.seconds"
  tail -n 3 "$parts/$i.stderr" >&2
done

mkdir -p "$(dirname "$out")"
"$python" - "$parts" "$out" "${#names[@]}" <<'PY'
import json, sys
from pathlib import Path

parts, out, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def read(path, default=""):
    return path.read_text().strip() if path.exists() else default


environment, gathered = None, []
for i in range(count):
    results, lines = [], read(parts / f"{i}.jsonl").splitlines()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "environment" in record:
            environment = environment or record["environment"]
        elif "variant" in record:
            results.append(record)
    code = read(parts / f"{i}.code", "skipped")
    gathered.append({
        "name": read(parts / f"{i}.name"), "command": read(parts / f"{i}.command"),
        "exit_code": int(code) if code.lstrip("-").isdigit() else code,
        "seconds": float(read(parts / f"{i}.seconds", "0")), "results": results,
        "stderr_tail": read(parts / f"{i}.stderr")[-2000:],
    })


def find(part, variant, concepts=None):
    for p in gathered:
        if p["name"] == part:
            for r in p["results"]:
                if r["variant"] == variant and (concepts is None or r["concepts"] == concepts):
                    return r
    return None


core = find("bf16_suite", "core")
c8 = find("bf16_scaling", "core", 8)
goals = {
    "core_bf16_mfu": core and core["mfu"],
    "core_bf16_mfu_at_least_0.40": None if not core or core["mfu"] is None
    else core["mfu"] >= 0.40,
    "core_bf16_300_steps_s": core and 300 * core["median_s"],
    "core_bf16_300_steps_plus_compile_s": core and 300 * core["median_s"] + core["compile_s"]
    + core["lower_s"] + core["first_call_s"],
    "per_concept_ratio_c8": c8 and c8["per_concept_ratio"],
    "per_concept_ratio_c8_at_most_0.6": None if not c8 else c8["per_concept_ratio"] <= 0.6,
}
goals["concept_300_steps_under_60_s"] = (
    None if core is None else goals["core_bf16_300_steps_s"] < 60)
goals["concept_300_steps_with_compile_under_60_s"] = (
    None if core is None else goals["core_bf16_300_steps_plus_compile_s"] < 60)
out.write_text(json.dumps(
    {"environment": environment, "parts": gathered, "goals": goals}, indent=2) + "\n")
print(f"wrote {out}")
print(json.dumps(goals, indent=2))
PY
