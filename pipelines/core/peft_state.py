"""Temporary peft adapter changes on the shared UNet, and the bookkeeping that undoes them.

`peft_state_restored` snapshots the UNet's peft state (which adapters exist, which layers are wrapped, their
enabled flags, active adapters and scales) and every parameter's requires_grad; on exit (normal, error or
cancel) it deletes adapters added inside, unwraps layers that peft wrapped for them, and puts the rest back, so
the UNet is the same module tree computing the same outputs. The drag's per-image LoRA (pipelines/drag/lora.py)
and LoRA unloading (pipelines/core/lora.py) both use it.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

from peft.tuners.tuners_utils import BaseTunerLayer


def adapter_configs(unet) -> dict:
    """The UNet's peft adapters by name (a copy; empty when peft never touched it)."""
    return dict(getattr(unet, "peft_config", None) or {})


def tuner_layers(unet) -> dict[str, BaseTunerLayer]:
    """Every peft-wrapped layer of the UNet by module name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def unwrap_unused_layers(unet) -> None:
    """Puts the plain module back wherever a peft layer holds no adapter any more (after deleting adapters); once
    no adapter is left, diffusers' `unload_lora` removes every peft layer and peft's bookkeeping: the UNet is then
    the module tree it was before any adapter."""
    if not adapter_configs(unet):
        if tuner_layers(unet) or getattr(unet, "peft_config", None) is not None:
            unet.unload_lora()
        return
    for name, layer in tuner_layers(unet).items():
        if not any(len(getattr(layer, attr, None) or {}) for attr in layer.adapter_layer_names):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, layer.get_base_layer())


@contextmanager
def peft_state_restored(unet):
    """Everything peft- and grad-related on `unet` is as before when the block exits, however it exits."""
    adapters = set(adapter_configs(unet))
    layers = {n: (m.disable_adapters, list(m.active_adapters), dict(getattr(m, "scaling", {})))
              for n, m in tuner_layers(unet).items()}
    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    try:
        yield
    finally:
        added = [a for a in adapter_configs(unet) if a not in adapters]
        if added:
            with quiet_peft():
                unet.delete_adapters(added)
        # layers wrapped only for the adapters just deleted hold none now: the plain module goes back (and with
        # no adapter before, peft's layers and bookkeeping go entirely)
        unwrap_unused_layers(unet)
        for name, layer in tuner_layers(unet).items():
            disabled, active, scaling = layers[name]
            layer.set_adapter(active)           # also flips requires_grad: restored below
            layer.enable_adapters(not disabled)
            if hasattr(layer, "scaling"):
                layer.scaling.update(scaling)
        for name, p in unet.named_parameters():
            p.requires_grad_(grads.get(name, False))


@contextmanager
def adapters_active(unet, weights: dict[str, float]):
    """Switches exactly these adapters on at these weights, frozen (the drag only needs gradients w.r.t. the
    latent); call inside `peft_state_restored`, which puts flags, scales and grads back."""
    if not weights:
        yield
        return
    unet.enable_lora()
    unet.set_adapters(list(weights), [float(w) for w in weights.values()])
    freeze_lora(unet)
    try:
        yield
    finally:
        unet.disable_lora()


@contextmanager
def quiet_peft():
    """peft warns that a second adapter joins a loaded one (the Smooth LoRA) and that deleting the active one
    activates another: both are intended here (the flags are put back by peft_state_restored)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Already found a `peft_config`")
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        yield


def freeze_lora(unet) -> None:
    """Every LoRA weight of the UNet frozen (requires_grad False)."""
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
