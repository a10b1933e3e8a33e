"""MPTConfig: the hub's MPT config.json, validated once and read through typed views.

On disk the config keeps the hub layout (`attn_config`, `init_config`, `ffn_config` dicts) so that
published checkpoints load unchanged. Model code never reads those dicts: it reads `config.attn`,
`config.init` and `config.ffn`, dataclasses built and checked here.

Field values are stored in the JSON types that transformers' own (strict) `MptConfig` validates,
whatever the caller passed: `alibi_bias_max: 8.0` is kept as 8, `clip_qkv: 6` as 6.0 (see
`_as_declared_type`), so that a saved config.json also loads without mptkit's remote code.

Overrides of a config's fields (presets, training runs, `init_from` models) are applied by one
function, `merge_config_fields`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from .alibi import DEFAULT_ALIBI_BIAS_MAX
from .presets import preset_fields

ATTN_TYPES = {"multihead_attention", "multiquery_attention", "grouped_query_attention"}
ATTN_IMPLS = ("auto", "torch", "sdpa", "flex", "flash")
NORM_TYPES = {"layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm"}
FFN_TYPES = {"mptmlp", "mptglu"}
INIT_NAMES = {
    "kaiming_normal_",
    "kaiming_uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "baseline_",
    "small_init_",
    "neox_init_",
}
# MPT's FFN width as a multiple of d_model, which transformers' own MptMLP hard-codes.
DEFAULT_EXPANSION_RATIO = 4
# attn_config keys written by later llm-foundry versions that do not change the math we implement.
_IGNORED_ATTN_KEYS = {"rope_impl", "rope_dail_config", "rope_hf_config", "fused_qkv", "flash_attn_version"}


def _generic_config_keys() -> set[str]:
    """Keys of any transformers config: transformers 5 writes them into a saved MPT attn_config."""
    return set(PretrainedConfig().to_dict())


class ConfigError(ValueError):
    """An invalid model configuration.

    `field` is the dotted name of the bad field (None when no single field is to blame), `message`
    says what is wrong and `scope` names the config the field belongs to ("MPTConfig"). str() joins
    them: "MPTConfig.attn_config.alibi_bias_max: expected > 0, got -1". A training run's config
    raises its own error (mptkit.train.typed_yaml), which adds where the value was set.
    """

    def __init__(self, message: str, *, field: str | None = None, scope: str | None = None):
        self.message, self.field, self.scope = message, field, scope
        super().__init__(str(self))

    def __str__(self) -> str:
        name = ".".join(part for part in (self.scope, self.field) if part)
        return ": ".join(part for part in (name, self.message) if part)

    def __reduce__(self):  # keyword-only arguments: rebuild from the message, then restore the rest
        return (type(self), (self.message,), dict(self.__dict__))


def _fail(field: str, message: str) -> typing.NoReturn:
    raise ConfigError(message, field=field, scope="MPTConfig")


# The hub dicts inside config.json; their keys are merged one by one (every other field is replaced).
NESTED_SECTIONS = ("attn_config", "init_config", "ffn_config")


def merge_config_fields(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` config fields with `overrides` applied: the nested sections key by key, others replaced.

    The one merge of MPT config fields (presets, `MPTConfig.from_preset`, a training run's
    `model:` section over a preset or an `init_from` model). Neither argument is changed.
    """
    merged = copy.deepcopy(base)
    for key, value in copy.deepcopy(overrides).items():
        if key not in NESTED_SECTIONS:
            merged[key] = value
        elif value is None or isinstance(value, dict):
            merged[key] = {**(merged.get(key) or {}), **(value or {})}
        else:
            _fail(key, f"expected a mapping of {key} keys, got {value!r}")
    return merged


def _as_declared_type(value: Any, hint: Any) -> Any:
    """`value` in the JSON type its field declares, which is the type transformers' MptConfig checks.

    Whole floats become ints where an int is allowed (alibi_bias_max 8.0 -> 8, expansion_ratio 4.0
    -> 4), ints become floats where only a float is (clip_qkv 6 -> 6.0), and numeric strings become
    numbers where a float is allowed (YAML 1.1 reads `1e-5` as a string). A genuinely fractional
    value stays as it is: `int | float` fields (alibi_bias_max 12.5) keep it for mptkit's own code.
    Anything else is left for validation to judge.
    """
    if isinstance(value, bool):
        return value
    allowed = set(typing.get_args(hint)) or {hint}
    if isinstance(value, str) and float in allowed:
        try:
            number = float(value)
        except ValueError:
            return value
        value = number if math.isfinite(number) else value
    if isinstance(value, float) and int in allowed and value.is_integer():
        return int(value)
    if isinstance(value, int) and int not in allowed and float in allowed:
        return float(value)
    return value


@functools.cache
def _declared_types(target) -> dict[str, Any]:
    return typing.get_type_hints(target)


def _from_dict(cls, section: str, values: dict[str, Any] | None, ignored: set[str] = frozenset()):
    """Build a typed section from its hub dict: unknown keys fail, naming the closest known key."""
    values = dict(values or {})
    types = _declared_types(cls)
    for key in list(values):
        if key in ignored:
            values.pop(key)
        elif key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(f"{section}.{key}", f"unknown key{hint}; known keys: {sorted(types)}")
        else:
            values[key] = _as_declared_type(values[key], types[key])
    return cls(**values)


@dataclass(frozen=True)
class AttnConfig:
    attn_type: str = "multihead_attention"
    attn_impl: str = "torch"
    # `int | float`: transformers types these as int (the hub writes 0 and 8); a fraction is kept.
    attn_pdrop: int | float = 0
    softmax_scale: float | None = None
    alibi: bool = False
    alibi_bias_max: int | float = DEFAULT_ALIBI_BIAS_MAX
    clip_qkv: float | None = None
    qk_ln: bool = False
    prefix_lm: bool = False
    attn_uses_sequence_id: bool = False
    kv_n_heads: int | None = None
    rope: bool = False
    rope_theta: float = 10000.0
    sliding_window_size: int = -1


@dataclass(frozen=True)
class InitConfig:
    name: str = "kaiming_normal_"
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    init_div_is_residual: bool | float = True
    init_gain: float = 0.0
    init_std: float | None = 0.02
    emb_init_std: float | None = None
    emb_init_uniform_lim: float | list[float] | None = None
    verbose: int = 0


@dataclass(frozen=True)
class FFNConfig:
    ffn_type: str = "mptmlp"
    ffn_hidden_size: int | None = None


class MPTConfig(PretrainedConfig):
    model_type = "mpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        d_model: int = 2048,
        n_heads: int = 16,
        n_layers: int = 24,
        expansion_ratio: int | float = DEFAULT_EXPANSION_RATIO,  # transformers types it as int; a fraction is kept
        max_seq_len: int = 2048,
        vocab_size: int = 50432,
        resid_pdrop: float = 0.0,
        emb_pdrop: float = 0.0,
        learned_pos_emb: bool = True,
        attn_config: dict | None = None,
        ffn_config: dict | None = None,
        init_device: str = "cpu",
        logit_scale: float | str | None = None,
        no_bias: bool = True,
        embedding_fraction: float = 1.0,
        norm_type: str = "low_precision_layernorm",
        layer_norm_epsilon: float = 1e-5,
        use_cache: bool = False,
        init_config: dict | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.expansion_ratio = expansion_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.resid_pdrop = resid_pdrop
        self.emb_pdrop = emb_pdrop
        self.learned_pos_emb = learned_pos_emb
        self.init_device = init_device
        self.logit_scale = logit_scale
        self.no_bias = no_bias
        self.embedding_fraction = embedding_fraction
        self.norm_type = norm_type
        self.layer_norm_epsilon = layer_norm_epsilon
        self.use_cache = use_cache
        for name, hint in _declared_types(MPTConfig.__init__).items():
            if name in self.__dict__:  # the plain fields just set (not the sections, nor super()'s)
                setattr(self, name, _as_declared_type(getattr(self, name), hint))
        # Older hub configs spell the attention dict without the newer keys: fill in defaults, then
        # store the complete dicts so that what is saved is what was validated.
        attn = _from_dict(AttnConfig, "attn_config", attn_config, _IGNORED_ATTN_KEYS | _generic_config_keys())
        if attn.attn_impl == "triton":
            warnings.warn("attn_impl 'triton' (llm-foundry's old kernel) is served by mptkit's 'auto' choice")
            attn = dataclasses.replace(attn, attn_impl="auto")
        if attn.kv_n_heads is None and attn.attn_type != "grouped_query_attention":
            # Written out: vLLM takes a present kv_n_heads as the KV head count, and null breaks it.
            n_kv = 1 if attn.attn_type == "multiquery_attention" else self.n_heads
            attn = dataclasses.replace(attn, kv_n_heads=n_kv)
        self.attn_config = dataclasses.asdict(attn)
        self.ffn_config = dataclasses.asdict(_from_dict(FFNConfig, "ffn_config", ffn_config, {"fc_type"}))
        self.init_config = dataclasses.asdict(_from_dict(InitConfig, "init_config", init_config))
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, use_cache=use_cache, **kwargs)
        self._validate()

    # ---- typed views (the model reads only these) -------------------------------------------
    @property
    def attn(self) -> AttnConfig:
        return AttnConfig(**self.attn_config)

    @property
    def init(self) -> InitConfig:
        return InitConfig(**self.init_config)

    @property
    def ffn(self) -> FFNConfig:
        return FFNConfig(**self.ffn_config)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        attn = self.attn
        if attn.attn_type == "multihead_attention":
            return self.n_heads
        if attn.attn_type == "multiquery_attention":
            return 1
        return attn.kv_n_heads

    @property
    def num_key_value_heads(self) -> int:  # the name transformers' caches look for
        return self.kv_n_heads

    @property
    def ffn_hidden_size(self) -> int:
        return self.ffn.ffn_hidden_size or int(self.d_model * self.expansion_ratio)

    @property
    def uses_learned_positions(self) -> bool:
        # The hub's MPT-7B sets learned_pos_emb=true with alibi on; the table is then never built.
        attn = self.attn
        return self.learned_pos_emb and not attn.alibi and not attn.rope

    @property
    def logit_multiplier(self) -> float | None:
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return self.logit_scale

    # ---- validation -----------------------------------------------------------------------
    def _validate(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, f"expected a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            _fail("d_model", f"{self.d_model} is not divisible by n_heads={self.n_heads}")
        if not self.expansion_ratio or self.expansion_ratio <= 0:
            _fail("expansion_ratio", f"expected > 0, got {self.expansion_ratio!r}")
        for name in ("resid_pdrop", "emb_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(name, f"expected a probability in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 < self.embedding_fraction <= 1.0:
            _fail("embedding_fraction", f"expected a value in (0, 1], got {self.embedding_fraction!r}")
        if self.norm_type not in NORM_TYPES:
            _fail("norm_type", f"unknown {self.norm_type!r}; expected one of {sorted(NORM_TYPES)}")
        if self.logit_scale is not None and self.logit_scale != "inv_sqrt_d_model":
            if isinstance(self.logit_scale, str) or self.logit_scale <= 0:
                _fail("logit_scale", f"expected a positive number or 'inv_sqrt_d_model', got {self.logit_scale!r}")
        self._validate_attn(self.attn)
        if self.ffn.ffn_type not in FFN_TYPES:
            _fail("ffn_config.ffn_type", f"unknown {self.ffn.ffn_type!r}; expected one of {sorted(FFN_TYPES)}")
        init = self.init
        if init.name not in INIT_NAMES:
            _fail("init_config.name", f"unknown {init.name!r}; expected one of {sorted(INIT_NAMES)}")
        if init.fan_mode not in ("fan_in", "fan_out"):
            _fail("init_config.fan_mode", f"expected 'fan_in' or 'fan_out', got {init.fan_mode!r}")

    def _validate_attn(self, attn: AttnConfig) -> None:
        if attn.attn_type not in ATTN_TYPES:
            _fail("attn_config.attn_type", f"unknown {attn.attn_type!r}; expected one of {sorted(ATTN_TYPES)}")
        if attn.attn_impl not in ATTN_IMPLS:
            _fail("attn_config.attn_impl", f"unknown {attn.attn_impl!r}; expected one of {list(ATTN_IMPLS)}")
        if attn.attn_type == "grouped_query_attention":
            if not isinstance(attn.kv_n_heads, int) or attn.kv_n_heads < 1:
                _fail("attn_config.kv_n_heads", f"grouped_query_attention needs a positive kv_n_heads, got {attn.kv_n_heads!r}")
            if self.n_heads % attn.kv_n_heads:
                _fail("attn_config.kv_n_heads", f"n_heads={self.n_heads} is not divisible by kv_n_heads={attn.kv_n_heads}")
        if attn.alibi and attn.rope:
            _fail("attn_config.rope", "alibi and rope are both enabled; choose one position scheme")
        if attn.alibi and attn.alibi_bias_max <= 0:
            _fail("attn_config.alibi_bias_max", f"expected > 0, got {attn.alibi_bias_max!r}")
        if attn.clip_qkv is not None and attn.clip_qkv <= 0:
            _fail("attn_config.clip_qkv", f"expected null or > 0, got {attn.clip_qkv!r}")
        if attn.softmax_scale is not None and attn.softmax_scale <= 0:
            _fail("attn_config.softmax_scale", f"expected null or > 0, got {attn.softmax_scale!r}")
        if not 0.0 <= attn.attn_pdrop < 1.0:
            _fail("attn_config.attn_pdrop", f"expected a probability in [0, 1), got {attn.attn_pdrop!r}")
        if attn.sliding_window_size != -1 and attn.sliding_window_size < 1:
            _fail("attn_config.sliding_window_size", f"expected -1 (off) or >= 1, got {attn.sliding_window_size!r}")
        if attn.rope and self.head_dim % 2:
            _fail("attn_config.rope", f"rope needs an even head dimension, got {self.head_dim}")

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MPTConfig":
        """A named configuration (see presets.py), with field overrides.

        `attn_config` / `init_config` / `ffn_config` overrides are merged into the preset's dicts.
        """
        return cls(**merge_config_fields(preset_fields(name), overrides))
