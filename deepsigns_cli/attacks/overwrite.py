"""Overwriting: the attacker embeds a watermark of its own with our keygen and embed.

The method and the carrier layer are public (Kerckhoffs): the attacker runs the same schemes
with their default options, so its keys sit where the owner's do, but its secrets are fresh
(drawn from --seed's generator), not the owner's. The attacker's bundle is sealed with the
passphrase like any owner's, so that `extract` and `verify` can show the attacker's claim
next to the owner's (the ambiguity a dispute must settle).
"""

from __future__ import annotations

from .base import Attack

__all__ = ["OverwriteAttack", "ATTACK"]

_DEFAULT_SCHEMES = "hidden,output"


class OverwriteAttack(Attack):
    """`epochs`: the epochs each scheme ran (its own default, or --epochs); `lr`: the rate (--lr, else the
    one the model's training ended with, as embed takes it)."""

    name = "overwrite"

    def run(self, model, ctx):
        from .. import api
        from ..bundle import BUNDLE_MODE, write_bundle
        from ..errors import InputError, NotLearnt
        from ..registry import embed_order, scheme_entry

        target = ctx.option("attacker_keys", None)
        if not target:
            raise InputError("--attacker-keys is required: the bundle of the attacker's keys to write")
        names = [s.strip() for s in str(ctx.option("scheme", _DEFAULT_SCHEMES)).split(",") if s.strip()]
        if not names:
            raise InputError(f"--scheme names no scheme: give one or more, comma-separated "
                             f"(default {_DEFAULT_SCHEMES})")
        for name in names:
            scheme_entry(name)  # an unknown name fails here, with the list
        if len(set(names)) != len(names):
            raise InputError(f"--scheme names a scheme twice: {','.join(names)}")
        epochs = ctx.option("epochs", None)
        lr = float(ctx.option("lr", ctx.info.lr))  # (embed's default: the rate the model's training ended with)
        if ctx.passphrase is None:  # (api.attack gives one to every row with passphrase=True)
            raise InputError("attack overwrite seals the attacker's bundle: it needs a passphrase")
        api.check_bundle_name(target, "--attacker-keys")
        tmp = ctx.add_output(target, "--attacker-keys", mode=BUNDLE_MODE)
        secret = ctx.passphrase()

        seed = int(ctx.rng.integers(2**32))  # the attacker's secrets: fresh, but from --seed
        bundle = api.make_keys(model, ctx.info, ctx.data, names, {n: {} for n in names}, seed=seed)
        try:
            model, _, bundle, report = api.embed_keys(model, ctx.info, ctx.data, bundle, epochs=epochs, lr=lr,
                                                      seed=ctx.seed, device=ctx.device, progress=ctx.progress,
                                                      batch_size=ctx.batch_size, workers=ctx.workers,
                                                      precision=ctx.precision)
        except NotLearnt as err:  # (the attacker's keys are made at the defaults: --epochs is the remedy)
            raise NotLearnt(f"the attacker's embedding: {err.what}", "raise --epochs") from None
        commitment = write_bundle(bundle, tmp, secret)
        ran = {name: report["schemes"][name]["epochs"] for name in embed_order(names)}
        return model, {"schemes": list(embed_order(names)), "epochs": ran, "lr": lr, "attacker_keys": str(target),
                       "attacker_key_id": bundle.key_id, "attacker_commitment": commitment}


ATTACK = OverwriteAttack
