#!/usr/bin/env bash
# The dispute after overwriting, through the CLI, for seeds 1 2 3 (issue 7's figure):
# the owner keygens and embeds into the sample MLP; a thief runs our own keygen and embed
# (fresh secrets) on the owner's marked model; `deepsigns dispute` reads the cross matrix.
#   bash scripts/dispute_figure.sh [SEED ...]
set -euo pipefail
DS=${DS:-.venv/bin/deepsigns}
SAMPLE=sample_models/digits-mlp.safetensors
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "owner passphrase" > "$work/owner.pass"
echo "thief passphrase" > "$work/thief.pass"
for seed in "${@:-1 2 3}"; do
  for s in $seed; do
    d="$work/seed$s"; mkdir -p "$d"
    $DS keygen --model $SAMPLE --data digits --seed "$s" --out "$d/owner.dskey" --passphrase-file "$work/owner.pass" -q --json > /dev/null
    $DS embed --model $SAMPLE --keys "$d/owner.dskey" --seed "$s" --out "$d/owner.safetensors" --passphrase-file "$work/owner.pass" -q --json > /dev/null
    $DS keygen --model "$d/owner.safetensors" --data digits --seed $((s + 100)) --out "$d/thief.dskey" --passphrase-file "$work/thief.pass" -q --json > /dev/null
    $DS embed --model "$d/owner.safetensors" --keys "$d/thief.dskey" --seed $((s + 100)) --out "$d/thief.safetensors" --passphrase-file "$work/thief.pass" -q --json > /dev/null
    set +e
    $DS dispute --party "$d/owner.dskey" "$work/owner.pass" "$d/owner.safetensors" \
                --party "$d/thief.dskey" "$work/thief.pass" "$d/thief.safetensors" \
                --name owner --name thief --json > "$d/dispute.json"
    code=$?
    set -e
    python3 - "$d/dispute.json" "$s" "$code" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cell = {(c["keys_of"], c["model_of"]): c for c in r["matrix"]}
def show(k, m):
    c = cell[k, m]
    bits = [x for x in c["results"] if x["scheme"] == "hidden"][0]
    return f"{k} keys on {m} model: p={c['p_value']:.2g} ({bits['bit_errors']}/{bits['n_bits']} bits wrong)"
print(f"seed {sys.argv[2]} (exit {sys.argv[3]}): first = {r['first']}; " + "; ".join(
    show(k, m) for k, m in [("owner", "owner"), ("owner", "thief"), ("thief", "owner"), ("thief", "thief")]))
PY
  done
done
