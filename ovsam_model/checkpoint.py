"""Read weight files robustly and load them strictly, with errors in the official key naming.

Errors name the file, the component, the target module and the first bad key as it is spelled
in the released file (`fpn_neck.fpn_convs.3.conv.bias`), whatever the local module calls it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ovsam_model.atomic import torch_save_atomic
from ovsam_model.registry import ModelSpec, WeightFile

StateDict = dict[str, torch.Tensor]
Payload = Union[StateDict, torch.Tensor]


class CheckpointError(Exception):
    """A weight file that cannot be read or does not fit its target modules."""


_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", re.S)


def load_failure_reason(error: BaseException) -> str:
    """Why `torch.load(..., weights_only=True)` failed, in one line.

    torch's refusal starts with advice to retry with weights_only=False: wrong for a corrupt or
    truncated file, and unsafe for an untrusted one. It is replaced by what the refusal means,
    with the unpickler's own reason."""
    text = str(error).strip()
    if _WEIGHTS_ONLY_REFUSAL in text:
        found = _UNPICKLER_REASON.search(text)
        detail = found.group(1).splitlines()[0].strip() if found else ""
        return ("not a plain weight file: corrupt, truncated, or holding objects other than tensors"
                + (f" ({detail})" if detail else ""))
    return text.splitlines()[0] if text else type(error).__name__


def read_checkpoint(path: str | Path) -> Payload:
    """The tensors of a safetensors or torch file, on the CPU.

    A `{"state_dict": ...}` or `{"model": ...}` wrapper is unwrapped, a leading `module.`
    (DataParallel) is stripped, and mmengine's `_metadata` attribute is dropped. A file holding
    a bare tensor returns that tensor.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # unpickling / zip / safetensors errors have many types
        raise CheckpointError(f"{path.name}: cannot read weight file ({load_failure_reason(e)})") from e
    if isinstance(obj, torch.Tensor):
        return obj
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name}: holds a {type(obj).__name__}, not a state dict or tensor")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    state: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path.name}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state


def _target_module(model: nn.Module, attr: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(attr)
    except AttributeError:
        raise CheckpointError(f"{where}: the model has no module {attr!r}") from None


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def state_mismatch(module: nn.Module, selected: Mapping[str, torch.Tensor], prefix: str = "") -> str | None:
    """The first problem of loading `selected` (official keys minus `prefix`) strictly into
    `module` — unexpected / missing keys, else a shape — in official naming; None if it fits."""
    to_local = getattr(module, "official_key_map", None) or (lambda k: k)
    to_official = getattr(module, "local_key_map", None) or (lambda k: k)
    expected = module.state_dict()
    given = {to_local(k) for k in selected}
    unexpected = [k for k in selected if to_local(k) not in expected]
    missing = [k for k in expected if k not in given]
    problems = []
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        problems.append(f"unexpected key {prefix}{unexpected[0]}{more}")
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(f"missing key {prefix}{to_official(missing[0])}{more}")
    if problems:
        return "; ".join(problems)
    for key, value in selected.items():
        want = expected[to_local(key)].shape
        if value.shape != want:
            return f"key {prefix}{key} has shape {_fmt_shape(value.shape)}, expected {_fmt_shape(want)}"
    return None


def _load_into(module: nn.Module, prefix: str, selected: StateDict, where: str) -> None:
    """Strict load of `selected` (official keys minus `prefix`) into `module`."""
    problem = state_mismatch(module, selected, prefix)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    to_local = getattr(module, "official_key_map", None) or (lambda k: k)
    try:
        module.load_state_dict({to_local(k): v for k, v in selected.items()}, strict=True)
    except RuntimeError as e:  # dtype that cannot be copied, etc.
        raise CheckpointError(f"{where}: {str(e).splitlines()[0]}") from e


def load_payload(model: nn.Module, wf: WeightFile, payload: Payload, source: str) -> dict[str, torch.Tensor]:
    """Load what `read_checkpoint` returned into `model` according to `wf.targets`.

    Returns the non-module payloads: for a bare-tensor file (text embeddings) `{attr: tensor}`,
    which the caller stores (the model has no module to load it into); else `{}`.
    `source` is the file name used in error messages.
    """
    names = ", ".join(attr for _, attr in wf.targets)
    where = f"{source} (component {wf.component} → {names})"
    if wf.is_tensor:
        if not isinstance(payload, torch.Tensor):
            raise CheckpointError(f"{where}: expected a bare tensor, found a state dict "
                                  f"with {len(payload)} keys")
        want = wf.tensor_shape
        if payload.dim() != len(want) or any(w is not None and w != s for w, s in zip(want, payload.shape)):
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            raise CheckpointError(f"{where}: tensor has shape {_fmt_shape(payload.shape)}, expected {shown}")
        return {wf.targets[0][1]: payload}
    if isinstance(payload, torch.Tensor):
        raise CheckpointError(f"{where}: expected a state dict, found a bare tensor "
                              f"of shape {_fmt_shape(payload.shape)}")

    claimed: dict[int, StateDict] = {i: {} for i in range(len(wf.targets))}
    unclaimed = []
    for key, value in payload.items():
        for i, (prefix, _) in enumerate(wf.targets):
            if key.startswith(prefix):
                claimed[i][key[len(prefix):]] = value
                break
        else:
            unclaimed.append(key)
    if unclaimed and not wf.ignore_other_keys:
        more = f" (+{len(unclaimed) - 1} more)" if len(unclaimed) > 1 else ""
        raise CheckpointError(f"{where}: unexpected key {unclaimed[0]}{more}")
    for i, (prefix, attr) in enumerate(wf.targets):
        module = _target_module(model, attr, where)
        _load_into(module, prefix, claimed[i], f"{source} (component {wf.component} → {attr})")
    return {}


def load_weight_file(model: nn.Module, wf: WeightFile, path: str | Path) -> dict[str, torch.Tensor]:
    """Read `path` and load it strictly into `model`'s target modules (see `load_payload`)."""
    path = Path(path)
    return load_payload(model, wf, read_checkpoint(path), path.name)


def load_spec_weights(model: nn.Module, spec: ModelSpec, paths: Mapping[str, str | Path]) -> dict[str, torch.Tensor]:
    """Load every component of `spec` found in `paths` (component → file), in the spec's order,
    so later targets overwrite earlier ones. Returns the merged non-module payloads."""
    payloads: dict[str, torch.Tensor] = {}
    for wf in (*spec.files, *spec.user_files):
        if wf.component in paths:
            payloads.update(load_weight_file(model, wf, paths[wf.component]))
    return payloads


# --- synthetic files with the official layouts ----------------------------------------------

def synthetic_payload(layout: Mapping, seed: int = 0) -> Payload:
    """Random tensors with the names/shapes of one `ovsam-keys/*.json` layout.

    The layout's "keys" maps name → shape; a bare-tensor layout has "keys": null and a
    "tensor_shape". Tensors listed in "dtypes_non_fp32" as int64, and BatchNorm's
    `num_batches_tracked`, are int64 zeros.
    """
    gen = torch.Generator().manual_seed(int(seed))
    keys = layout.get("keys")
    if keys is None:
        if "tensor_shape" not in layout:
            raise ValueError("layout has neither 'keys' nor 'tensor_shape'")
        return torch.randn(tuple(layout["tensor_shape"]), generator=gen)
    non_fp32 = layout.get("dtypes_non_fp32") or {}
    state: StateDict = {}
    for name, shape in keys.items():
        if non_fp32.get(name) == "torch.int64" or name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.int64)
        else:
            state[name] = torch.randn(tuple(shape), generator=gen) * 0.02
    return state


def write_synthetic_checkpoint(layout_json: str | Path, out: str | Path, wrap_state_dict: bool = False,
                               seed: int = 0) -> Path:
    """Write a torch file with random tensors in exactly the layout of `layout_json`
    (optionally wrapped in `{"state_dict": ...}`), atomically. Returns `out`.

    For smoke-testing a deployment: `ovsam weights verify` accepts these files.
    """
    layout = json.loads(Path(layout_json).read_text())
    payload = synthetic_payload(layout, seed=seed)
    obj = {"state_dict": payload} if wrap_state_dict and isinstance(payload, dict) else payload
    out = Path(out)
    torch_save_atomic(obj, out)
    return out
