"""LoRA adapters on an MPT model, through `peft`: wrapping, the PEFT file format, merging, the base's
identity, and a compact frozen base (bf16 or int8 on any device, NF4 through bitsandbytes on CUDA).

The adapters are injected in place (`peft.inject_adapter_in_model`): the model stays an
`MPTForCausalLM` whose target Linear layers become `peft` LoRA layers, so the trainer's
parallelisms (activation checkpointing, compile, FSDP2 per block) and its checkpoints apply
unchanged, and parameter names are peft's (`...Wqkv.base_layer.weight`, `...Wqkv.lora_A.default.weight`).

On disk an adapter is what `PeftModel.save_pretrained` writes (`adapter_config.json`,
`adapter_model.safetensors` with `base_model.model.` keys), so `PeftModel.from_pretrained(base,
adapter)` reads it without mptkit; `base_identity.json` beside them records the base it was trained
on. This module sits below `loading` (the read side applies adapters through it) and imports no
other area: the caller passes in what it read of the base.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mptkit.files import staged

DEFAULT_TARGET_MODULES = ("Wqkv", "out_proj", "up_proj", "down_proj")  # MPT's projections
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_IDENTITY = "base_identity.json"
CHECKPOINT_ADAPTER_DIR = "adapter"  # a LoRA run's PEFT adapter, inside each checkpoint and its output_dir
_ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."  # the keys of PeftModel's saved state dict


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install 'mptkit[lora]' (peft>=0.13)") from None
    return peft


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA setup (Hu et al. 2021): the adapters peft builds, and how the frozen base is held. The
    `lora:` section of a training run, or what a saved adapter records.

    The model's weights stay frozen and each target Linear learns a low-rank update
    (alpha / rank) * B @ A; only A and B (and modules_to_save) train.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Names of the layers to adapt (the last part of their module path); MPT's four projections.
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    # Modules trained in full beside the adapters (e.g. norm_f, or wte), saved with the adapter.
    modules_to_save: tuple[str, ...] = ()
    # The frozen base's block projections: as they are (in the precision's dtype); stored in bf16
    # or int8 and computed in the precision's dtype (any device, one process: bf16 with fp32 compute
    # is for CPUs without native bf16); nf4 (QLoRA: bitsandbytes, CUDA only).
    base_quantization: Literal["none", "bf16", "int8", "nf4"] = "none"

    def peft_config(self, base_path: str | None = None):
        """peft's LoraConfig; a hub base recorded as org/name@commit is written as PEFT writes a hub
        base: base_model_name_or_path org/name, revision commit."""
        peft = require_peft()
        revision = None
        if base_path is not None and not Path(base_path).exists() and "@" in base_path:
            base_path, _, revision = base_path.partition("@")
        return peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.target_modules),
            modules_to_save=list(self.modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
            base_model_name_or_path=base_path, revision=revision)


# ---- which modules can be adapted ------------------------------------------------------------------


def _modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Last name of each submodule (what `target_modules` matches) -> the first module of that name."""
    found: dict[str, nn.Module] = {}
    for qualified, module in model.named_modules():
        if qualified:
            found.setdefault(qualified.rpartition(".")[2], module)
    return found


def module_names(model: nn.Module) -> set[str]:
    """Names of the modules that hold parameters themselves (what `modules_to_save` may name)."""
    return {name for name, module in _modules_by_name(model).items() if any(True for _ in module.parameters(False))}


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted(name for name, module in _modules_by_name(model).items() if isinstance(module, nn.Linear))


def target_problem(model: nn.Module, name: str) -> str | None:
    """Why LoRA cannot adapt the modules called `name` in `model` (None: it can)."""
    modules, linear = _modules_by_name(model), ", ".join(linear_module_names(model))
    if name not in modules:
        return f"no module of this model is called {name!r}; its Linear modules are {linear}"
    if name == "wte" and getattr(model.config, "tie_word_embeddings", False):
        return ("wte is tied to the output projection (tie_word_embeddings: true), which reads wte.weight "
                "directly: LoRA on it would adapt the input lookup only, and a merge would change both. Train "
                "it whole with lora.modules_to_save: [wte]")
    if not isinstance(modules[name], (nn.Linear, nn.Embedding)):
        return (f"{name} is not a Linear layer ({type(modules[name]).__name__}): LoRA wraps Linear (and untied "
                f"Embedding) layers; train it whole with lora.modules_to_save, or adapt one of {linear}")
    return None


# ---- wrapping ----------------------------------------------------------------------------------------


def add_lora(model: nn.Module, spec: LoraSpec, base_path: str | None = None) -> nn.Module:
    """Inject LoRA layers into `model` in place (a meta-device model too): every parameter but the
    adapters' (and `modules_to_save` copies) is frozen. Adapter weights are kept in fp32 whatever
    the base's dtype (peft would give them the base's); lora_A draws from torch's global RNG."""
    peft = require_peft()
    for name in spec.target_modules:
        if (problem := target_problem(model, name)) is not None:
            raise ValueError(f"LoRA target_modules: {problem}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        peft.inject_adapter_in_model(spec.peft_config(base_path), model, adapter_name=_ADAPTER_NAME)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the file format ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseIdentity:
    """The base an adapter was trained on: where it was read, and a checksum of what it is."""

    path: str | None  # None: a preset's seeded initialisation
    sha256: str  # of its config fields and its weight files' names, sizes and sampled bytes

    def short(self) -> str:
        return f"{self.path or 'a preset initialisation'} (sha256 {self.sha256[:12]})"


_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024


def _file_fingerprint(file: Path) -> str:
    """Name, size and 16 evenly spaced 64 KiB samples of a weights file: cheap (1 MiB read per file,
    not gigabytes), and two trainings of one architecture (same names, same sizes) differ in them."""
    size = file.stat().st_size
    digest = hashlib.sha256(f"{file.name}\t{size}".encode())
    with open(file, "rb") as handle:
        for index in range(_SAMPLES):
            handle.seek(max(size - _SAMPLE_BYTES, 0) * index // max(_SAMPLES - 1, 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def base_identity(path: str | Path | None, config_fields: dict, weight_files: list[Path] = ()) -> BaseIdentity:
    """The identity of a base: its config fields (as stored) and a fingerprint of each weights file."""
    digest = hashlib.sha256(json.dumps(config_fields, sort_keys=True, default=str).encode())
    for file in sorted(Path(f) for f in weight_files):
        digest.update(f"\n{_file_fingerprint(file)}".encode())
    return BaseIdentity(path=None if path is None else str(path), sha256=digest.hexdigest())


def read_base_identity(directory: Path) -> BaseIdentity | None:
    file = Path(directory) / BASE_IDENTITY
    return BaseIdentity(**json.loads(file.read_text())) if file.is_file() else None


def adapter_files(model: nn.Module, trainable_state: dict[str, torch.Tensor], spec: LoraSpec,
                  base: BaseIdentity) -> dict[str, bytes]:
    """The files of a PEFT adapter (name -> content) from the full (unsharded) trainable state of an
    adapted model, as `PeftModel.save_pretrained` would write them, plus the base's identity."""
    peft = require_peft()
    from safetensors.torch import save

    state = peft.get_peft_model_state_dict(model, state_dict=trainable_state, adapter_name=_ADAPTER_NAME)
    weights = {_PEFT_PREFIX + key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}
    config = spec.peft_config(base.path).to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    return {
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
        ADAPTER_WEIGHTS: save(weights, metadata={"format": "pt"}),
        BASE_IDENTITY: json.dumps(asdict(base), indent=2).encode(),
    }


def save_adapter(model: nn.Module, directory: str | Path, spec: LoraSpec, base: BaseIdentity) -> Path:
    """Write the adapter of a (one-process) adapted model to `directory` (whole, or not at all)."""
    directory = Path(directory)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    files = adapter_files(model, trainable, spec, base)
    with staged(directory, sum(len(content) for content in files.values())) as temp:
        temp.mkdir()
        for name, content in files.items():
            (temp / name).write_bytes(content)
    return directory


def check_adapter_dir(directory: str | Path) -> Path:
    directory = Path(directory).expanduser()
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a PEFT adapter directory ({' and '.join(missing)} missing)")
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """`model` with the adapter in `directory` merged into its weights (a plain model again, as fast
    as the base at inference): read by peft itself, so any PEFT LoRA adapter of this model works."""
    peft = require_peft()
    directory = check_adapter_dir(directory)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        wrapped = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    return merge_adapter(wrapped)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA deltas into the base weights and drop the peft layers: a peft `PeftModel`, or a
    model with injected adapters (the trainer's). The result has the base model's parameter names."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    require_peft()
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for qualified, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            replacement = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            replacement = module.modules_to_save[_ADAPTER_NAME]
        else:
            continue
        parent_name, _, name = qualified.rpartition(".")
        setattr(model.get_submodule(parent_name), name, replacement)
    model.__dict__.pop("peft_config", None)  # set on the instance by the injection
    return model


# ---- a quantized frozen base -------------------------------------------------------------------------


class _WidenedMatMul(torch.autograd.Function):
    """x @ W^T for a frozen weight stored narrow (int8 with per-row scales, or bf16), widened to the
    compute dtype for each matmul, one layer at a time, and freed right after; a gradient for x only.

    Measured on 2 shared CPU cores (2048 -> 8192, 128 rows, forward + backward, int8 in fp32): within
    ~10% of bitsandbytes' CPU Linear8bitLt; aten's fused _weight_int8pack_mm (a decode kernel) took
    4.6x the fp32 Linear's time at this batch size.
    """

    @staticmethod
    def forward(ctx, x, weight, scales, compute_dtype):
        ctx.save_for_backward(weight, scales)
        ctx.compute_dtype = compute_dtype
        out = F.linear(x.to(compute_dtype), weight.to(compute_dtype))
        return (out if scales is None else out * scales).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        weight, scales = ctx.saved_tensors
        grad = grad.to(ctx.compute_dtype)
        grad_x = (grad if scales is None else grad * scales) @ weight.to(ctx.compute_dtype)
        return grad_x, None, None, None


class FrozenLinear(nn.Linear):
    """A frozen Linear stored in fewer bytes and computed in `compute_dtype`: int8 with one scale per
    output row (symmetric, a quarter of fp32's bytes) or bf16 (half). An `nn.Linear` to peft, which
    wraps it like any Linear (the LoRA delta stays in fp32)."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        weight = linear.weight.detach().float()
        if storage == torch.int8:
            scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            weight = (weight / scales[:, None]).round().clamp(-127, 127)
            self.scales = nn.Parameter(scales.to(compute_dtype), requires_grad=False)
        else:
            self.scales = None
        self.weight = nn.Parameter(weight.to(storage), requires_grad=False)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _WidenedMatMul.apply(x, self.weight, self.scales, self.compute_dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def _replace_block_linears(model: nn.Module, make) -> int:
    """Swap every Linear inside the transformer blocks for `make(linear)`; returns how many."""
    count = 0
    for block in model.transformer.blocks:
        for qualified, module in list(block.named_modules()):
            if type(module) is nn.Linear:
                parent_name, _, name = qualified.rpartition(".")
                setattr(block.get_submodule(parent_name), name, make(module))
                count += 1
    return count


@torch.no_grad()
def quantize_base(model: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Store the frozen base's block projections narrower, in place, before `add_lora` wraps them
    (the embedding and norms keep their dtype): bf16 or int8 on any device, computed in
    `compute_dtype`; nf4 is QLoRA's 4-bit NormalFloat through bitsandbytes, which needs CUDA (a
    training run's config is refused without it when it is read)."""
    if kind == "none":
        return model
    if kind in ("int8", "bf16"):
        storage = {"int8": torch.int8, "bf16": torch.bfloat16}[kind]
        _replace_block_linears(model, lambda linear: FrozenLinear(linear, storage, compute_dtype))
        for module in model.modules():  # the embedding and norms (the base may have been read in bf16)
            if not isinstance(module, FrozenLinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(compute_dtype)
        return model
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("nf4 needs bitsandbytes: pip install bitsandbytes") from None

    def nf4(linear: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu", compute_dtype), requires_grad=False,
                                         quant_type="nf4")
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to("cpu", compute_dtype), requires_grad=False)
        return layer.to(device)  # quantized on the way to the GPU

    _replace_block_linears(model, nf4)
    return model
