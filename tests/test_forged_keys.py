"""Keys sealed by hand: a party holds its own passphrase and can seal anything. Such keys may
claim too much, but never through a p-value that their own shape makes dishonest, a reading
that counts a non-number as a right bit, a crash, or a reading without end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PASSPHRASE, run_json

from deepsigns_cli import api, stats
from deepsigns_cli.bundle import open_bundle, write_bundle
from deepsigns_cli.checkpoint import load_checkpoint, save_checkpoint
from deepsigns_cli.errors import BundleError


def _forged(tmp_path, marked, scheme: str, change, **options):
    """A bundle keygen made for the sample model, changed by `change(params, arrays)`, sealed again."""
    path = tmp_path / f"{scheme}.dskey"
    run_json("keygen", "--model", marked.base, "--scheme", scheme, "--seed", 3, "--out", path, "--force",
             *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)])
    bundle = open_bundle(path, PASSPHRASE)
    keys = bundle.schemes[scheme]
    change(keys.params, keys.arrays)
    write_bundle(bundle, path, PASSPHRASE)
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_keys_that_claim_more_classes_than_they_use_claim_nothing(tmp_path, marked, seed):
    """Random inputs under random labels 0-9, sealed as keys of a million classes: the p-value
    assumed a chance of one in a million per key, and every digits model was 'detected'
    (8 of 100 matches, below the 1 in 9 of chance: p = 1.9e-37)."""
    rng = np.random.default_rng(seed)

    def change(params, arrays):
        params.update(embedded=True, num_classes=10**6, key_size=100)
        arrays["x"] = rng.uniform(0, 1, (100, *arrays["x_candidates"].shape[1:])).astype(np.float32)
        arrays["y"] = rng.integers(0, 10, 100)

    keys = _forged(tmp_path, marked, "output", change, key_size=20)
    report = api.extract(marked.base, keys, PASSPHRASE)
    result = report.results[0]
    assert not report.detected and result.p_value > 1e-3 and result.labels == 9


def test_gradsigns_keys_whose_inputs_or_step_are_out_of_any_range_are_damaged(tmp_path, marked):
    """Key inputs of 3e38 gave NaN gradients (read as right 0 bits), a step of 1e300 NaN scores
    (blamed on the suspect)."""
    for change in (lambda p, a: a.update(x=np.full_like(a["x"], 3e38)), lambda p, a: p.update(step=1e300),
                   lambda p, a: a.update(carriers=a["carriers"].astype(np.float64))):
        keys = _forged(tmp_path, marked, "gradsigns", change, bits=32)
        with pytest.raises(BundleError, match="damaged"):
            api.extract(marked.base, keys, PASSPHRASE)


def test_a_gradient_that_is_not_a_number_reads_no_bit(tmp_path, marked):
    """Every bit 0, read from a suspect whose weights give NaN gradients: NaN > 0 is false, so
    each bit read as a right 0 (p = 5e-20)."""
    keys = _forged(tmp_path, marked, "gradsigns", lambda p, a: a.update(bits=np.zeros_like(a["bits"])), bits=64)
    model, info = load_checkpoint(marked.base)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    suspect = tmp_path / "nan.safetensors"
    save_checkpoint(model, info, suspect)
    report = api.extract(suspect, keys, PASSPHRASE)
    assert not report.detected and report.results[0].bit_errors == 64 and set(report.results[0].bits) == {"?"}


def test_keys_of_more_bits_than_a_reading_counts_are_damaged(tmp_path, marked):
    """100,000 bits: the exact binomial tail ran for minutes, outside any time bound."""
    n = stats.MAX_BITS + 1

    def change(params, arrays):
        params.update(n_bits=n, n_carriers=1)
        arrays.update(K=np.ones((n, 1)), bits=np.zeros(n, np.uint8), carriers=arrays["carriers"][:1])

    keys = _forged(tmp_path, marked, "gradsigns", change, bits=32)
    with pytest.raises(BundleError, match="damaged"):
        api.extract(marked.base, keys, PASSPHRASE)
