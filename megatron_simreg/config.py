"""Run configuration: typed sections, YAML files that extend a base, dotted command-line overrides.

    cfg = load_config("configs/llama2-350m.yaml", ["simreg.weight=0", "training.micro_batch_size=4"])

A file may say `extends: base.yaml` (relative to itself); later files and then overrides win. An unknown
key is an error naming it and the nearest valid keys. `simreg.weight: auto` becomes 10 * sqrt(hidden / 1024).
The `regularizer:` section names the regularizer trained (SimReg by default, or a Table 1 baseline) and holds
that regularizer's own keys beside `name` and `weight`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

import yaml

from megatron_simreg import regularizers
from megatron_simreg.adagc import AdaGCConfig


class ConfigError(ValueError):
    """A config that cannot work, with what to change."""


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 172
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # grouped-query attention; None = one group per head
    vocab_size: int = 32000  # the tokenizer's; padded for tensor parallelism when the model is built
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 2048
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    num_experts: int | None = None  # MoE when set (Mixtral)
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_aux_loss_coeff: float = 0.01


@dataclass
class SimRegSection:
    enabled: bool = True
    weight: float | str = "auto"  # lambda; "auto" = 10 * sqrt(hidden_size / 1024)
    temperature: float = 0.01
    mode: str = "full"  # "full" | "chunk"
    chunk_size: int | None = None  # chunk mode: None = each rank's slice under SP/CP, else tokens per chunk
    reduction: str = "group"  # "group" | "token"
    layer: int = -1  # -1: final hidden states; k: output of decoder layer k (Sec. 5.3 ablation)
    block_size: int = 512  # tile size of the pairwise kernel
    kernel: str = "auto"  # "auto" (Triton on CUDA when importable, else PyTorch) | "torch" | "triton"
    deterministic: bool = False  # Triton backward without atomics (on by itself under Megatron's --deterministic-mode)


@dataclass
class RegularizerSection:
    """The regularizer trained beside the cross-entropy (megatron_simreg.regularizers, docs/baselines.md).

    name: simreg (the default), simcse, cpretrain, creg or sce. weight: a number, `auto` (its registered default),
    or null (SimReg: `simreg.weight`; a baseline: its default). The named regularizer's own keys sit flat in the
    same section (`regularizer: {name: sce, target: ema}`) and become `settings`; SimReg's are the `simreg:`
    section. Under a baseline SimReg is still computed and logged at weight 0 (unless simreg.enabled is false).
    """

    name: str = "simreg"
    weight: float | str | None = None
    settings: object = None  # the named baseline's settings dataclass; None for SimReg


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    min_lr: float | None = None  # None = lr / 10 (the paper's cosine floor)
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global-norm clipping when AdaGC is off


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000
    decay_style: str = "cosine"
    train_iters: int | None = None
    train_tokens: int | None = None  # alternative to train_iters


@dataclass
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 512
    precision: str = "bf16"  # "bf16" | "fp32"
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    save_interval: int = 1000
    # stop (with a checkpoint) every this many iterations, e.g. before a Slurm time limit
    exit_interval: int | None = None


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    moe_token_dispatcher: str = "alltoall"  # "alltoall" | "allgather"


@dataclass
class DataConfig:
    prefix: list[str] = field(default_factory=list)  # Megatron indexed datasets (PREFIX.bin/.idx)
    tokenizer: str | None = None  # SentencePiece model or HF folder; None = the default LLaMA-style 32k
    split: str = "98,1,1"  # shares of `prefix` by contiguous document ranges, unless held-out sets are given:
    # evaluation sets of their own (data/held_out.py); then `prefix` is all training data and `split` unused
    valid_prefix: str | None = None
    test_prefix: str | None = None  # scored once, at the end of training
    cache_dir: str | None = None


@dataclass
class LoggingConfig:
    run_dir: str | None = None  # None = runs/<config name>
    tensorboard: bool = True
    jsonl: bool = True
    wandb_project: str | None = None


@dataclass
class CheckpointConfig:
    save: str | None = None  # None = <run_dir>/checkpoints
    load: str | None = None  # None = resume from `save` when it holds a checkpoint
    load_iteration: int | None = None  # resume from this saved iteration instead of the latest
    # start from the weights of `load` only (iteration 0, fresh optimizer, schedule and RNG), as Megatron-LM's
    # --finetune: continued pretraining of an imported model (import_hf.py); the run saves into `save`, and
    # resumes from there once it holds a checkpoint
    finetune: bool = False


@dataclass
class MegatronSection:
    # megatron.training flags passed through as given, after the derived ones (so they win): GPU performance
    # settings (fusions, overlaps, attention backend) or anything else Megatron's parser takes. The local loop
    # (CPU) does not read them.
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    simreg: SimRegSection = field(default_factory=SimRegSection)
    regularizer: RegularizerSection = field(default_factory=RegularizerSection)
    adagc: AdaGCConfig = field(default_factory=AdaGCConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    megatron: MegatronSection = field(default_factory=MegatronSection)

    @property
    def simreg_weight(self) -> float:
        """lambda, with "auto" resolved as the paper's 10 * sqrt(hidden / 1024)."""
        if self.simreg.weight == "auto":
            return 10.0 * math.sqrt(self.model.hidden_size / 1024)
        return float(self.simreg.weight)

    @property
    def regularizer_weight(self) -> float:
        """The trained regularizer's weight: SimReg's lambda (simreg.weight unless regularizer.weight is set), or
        the baseline's (its registered default for null or auto)."""
        r = self.regularizer
        if r.weight is None and r.name == "simreg":
            return self.simreg_weight
        if r.weight is None or r.weight == "auto":
            return regularizers.get(r.name).default_weight(self.model.hidden_size)
        return float(r.weight)

    @property
    def run_dir(self) -> str:
        return self.logging.run_dir or os.path.join("runs", self.name)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        settings = out["regularizer"].pop("settings")  # the section is flat in YAML
        out["regularizer"].update(settings or {})
        return out


CHOICES = {
    "simreg.mode": ("full", "chunk"),
    "simreg.reduction": ("group", "token"),
    "simreg.kernel": ("auto", "torch", "triton"),
    "schedule.decay_style": ("cosine", "linear", "constant"),
    "training.precision": ("bf16", "fp32"),
    "parallel.moe_token_dispatcher": ("alltoall", "allgather"),
}

_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "at least 0")
_POSITIVE = (lambda v: v > 0, "positive")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
RANGES = {  # every numeric key's allowed values (None, where a key allows it, is not checked); AdaGC checks its own
    "model.num_layers": _AT_LEAST_1, "model.hidden_size": _AT_LEAST_1, "model.ffn_hidden_size": _AT_LEAST_1,
    "model.num_attention_heads": _AT_LEAST_1, "model.num_query_groups": _AT_LEAST_1, "model.vocab_size": _AT_LEAST_1,
    "model.make_vocab_size_divisible_by": _AT_LEAST_1, "model.seq_length": _AT_LEAST_1,
    "model.rotary_base": _AT_LEAST_1, "model.norm_epsilon": _POSITIVE, "model.init_method_std": _POSITIVE,
    "model.num_experts": _AT_LEAST_1, "model.moe_router_topk": _AT_LEAST_1, "model.moe_ffn_hidden_size": _AT_LEAST_1,
    "model.moe_aux_loss_coeff": _AT_LEAST_0,
    "simreg.weight": _AT_LEAST_0, "simreg.temperature": _POSITIVE, "simreg.chunk_size": _AT_LEAST_1,
    "simreg.layer": (lambda v: v >= -1, "at least -1"), "simreg.block_size": _AT_LEAST_1,
    "optimizer.lr": _POSITIVE, "optimizer.min_lr": _AT_LEAST_0, "optimizer.weight_decay": _AT_LEAST_0,
    "optimizer.adam_beta1": _FRACTION, "optimizer.adam_beta2": _FRACTION, "optimizer.adam_eps": _POSITIVE,
    "optimizer.clip_grad": _AT_LEAST_0,
    "schedule.warmup_steps": _AT_LEAST_0, "schedule.train_iters": _AT_LEAST_1, "schedule.train_tokens": _AT_LEAST_1,
    "training.micro_batch_size": _AT_LEAST_1, "training.global_batch_size": _AT_LEAST_1,
    "training.log_interval": _AT_LEAST_1, "training.eval_interval": _AT_LEAST_1, "training.eval_iters": _AT_LEAST_1,
    "training.save_interval": _AT_LEAST_1, "training.exit_interval": _AT_LEAST_1,
    "parallel.tensor": _AT_LEAST_1, "parallel.pipeline": _AT_LEAST_1, "parallel.context": _AT_LEAST_1,
    "parallel.expert": _AT_LEAST_1, "checkpoint.load_iteration": _AT_LEAST_1, "regularizer.weight": _AT_LEAST_0,
    "training.seed": (lambda v: 0 <= v < 2**31, "in [0, 2**31)"),  # Megatron adds rank offsets; numpy takes 32 bits
}
_SPLIT = re.compile(r"\s*\d+(\.\d*)?(\s*[,/]\s*\d+(\.\d*)?){0,2}\s*")  # Megatron's "train,valid,test" shares


def split_shares(split: str) -> list[float]:
    """data.split's shares as written (up to three, train first), read as megatron-core reads them."""
    return [float(share) for share in re.split(r"[,/]", split)]


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (following `extends`), apply `section.key=value` overrides, check it."""
    raw = _read_with_bases(path, seen=())
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} is not key=value (e.g. simreg.weight=0)")
        _check_key(key.strip(), source=f"override {override!r}")
        _set_dotted(raw, key.strip(), parse_yaml(value, f"override {override!r}"))
    return build_config(raw, source=path)


def build_config(raw: dict, source: str) -> Config:
    """A checked config from its sections as a mapping (a YAML file's, after `extends`); `source` names it in
    errors."""
    config = _build(Config, raw, prefix="", source=source)
    _check_values(config)
    return config


def resolved_dict(config: Config) -> dict:
    """The config as a run records it: `to_dict()` with the weights as the numbers used (lambda's `auto`, a
    baseline's default weight)."""
    resolved = config.to_dict()
    resolved["simreg"]["weight"] = config.simreg_weight
    if config.regularizer.name != "simreg" or config.regularizer.weight is not None:  # else simreg.weight is SimReg's
        resolved["regularizer"]["weight"] = config.regularizer_weight
    return resolved


def save_config(config: Config, run_dir: str) -> str:
    """Write the resolved config beside the run, as YAML that `load_config` reads back."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(resolved_dict(config), f, sort_keys=False)
    return path


def _read_with_bases(path: str, seen: tuple[str, ...]) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; the shipped ones are in configs/")
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(f"config {path!r} extends itself through {' -> '.join(seen)}")
    with open(path, encoding="utf-8") as f:
        data = parse_yaml(f, f"config file {path!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r} must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    merged = _read_with_bases(os.path.join(os.path.dirname(path), base), seen + (real,))
    return _deep_merge(merged, data)


def parse_yaml(text, source: str):
    """YAML, or one line naming the place of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from None


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_key(key: str, source: str) -> None:
    """Refuse a dotted key that names no config field, before it is merged with the files' keys."""
    cls, prefix = Config, ""
    for part in key.split("."):
        if cls is RegularizerSection:  # its keys depend on regularizer.name: checked when the section is built
            return
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{source}: {prefix.rstrip('.')!r} is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(prefix, part, names, source)
        cls, prefix = typing.get_type_hints(cls)[part], f"{prefix}{part}."


def _unknown_key(prefix: str, key: str, names: list[str], source: str) -> ConfigError:
    near = [prefix + name for name in difflib.get_close_matches(key, names, n=3, cutoff=0.5)]
    hint = f"did you mean {', '.join(near)}?" if near else f"valid keys: {', '.join(prefix + name for name in names)}"
    return ConfigError(f"unknown config key {prefix + key!r} in {source}; {hint}")


def _set_dotted(raw: dict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {section!r} is a value, not a section")
    node[leaf] = value


def _build(cls, raw, prefix: str, source: str):
    if cls is RegularizerSection:
        return _build_regularizer(raw, prefix, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} in {source} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(prefix, str(key), names, source)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{prefix}{key}.", source)
        else:
            values[key] = _coerce(value, hint, prefix + key)
    return cls(**values)


def _build_regularizer(raw, prefix: str, source: str) -> RegularizerSection:
    """`name`, `weight`, and the named regularizer's own keys (validated against its settings dataclass)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')} in {source} must be a mapping, got {raw!r}")
    name = raw.get("name", "simreg")
    if name not in regularizers.REGISTRY:
        raise ConfigError(f"{prefix}name must be one of {', '.join(regularizers.REGISTRY)}, got {name!r}")
    weight = _coerce(raw.get("weight"), float | str | None, prefix + "weight")
    own = {key: value for key, value in raw.items() if key not in ("name", "weight")}
    if name == "simreg":
        if own:
            raise ConfigError(f"config key {prefix + str(next(iter(own)))!r} in {source}: SimReg's settings are the "
                              "simreg: section (simreg.temperature, simreg.mode, simreg.chunk_size, ...)")
        return RegularizerSection(name, weight, None)
    settings = regularizers.get(name).settings
    names = [f.name for f in dataclasses.fields(settings)]
    for key in own:
        if key not in names:
            raise _unknown_key(prefix, str(key), ["name", "weight", *names], f"{source} (regularizer {name})")
    try:
        return RegularizerSection(name, weight, _build(settings, own, prefix, source))
    except ValueError as error:  # the settings' own checks name the key too
        raise ConfigError(str(error)) from None


# YAML 1.1 (PyYAML) reads "1e-3" as a string: it wants a dot in the mantissa ("1.0e-3").
_EXPONENT_ONLY = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(value, hint, key: str):
    """Check a value against its field's type (int for float is fine; a list of scalars for a list of str)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return None
        if kind is float and (isinstance(value, (int, float)) and not isinstance(value, bool)
                              or isinstance(value, str) and _EXPONENT_ONLY.fullmatch(value)):
            if not math.isfinite(float(value)):  # YAML's .inf and .nan, 1e999: every number must be finite
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
        if typing.get_origin(kind) is list:
            if isinstance(value, str):
                return [value]
            if isinstance(value, list) and all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value
            ):
                return [str(v) for v in value]  # YAML reads `[--moe-router-topk, 2]` with an int in it
    names = " or ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


def _check_ranges(config: Config) -> None:
    for key, (allowed, description) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not allowed(value):
            raise ConfigError(f"{key} must be {description}, got {value!r}")
    o, m, split = config.optimizer, config.model, config.data.split
    if o.min_lr is not None and o.min_lr > o.lr:
        raise ConfigError(f"optimizer.min_lr={o.min_lr} exceeds optimizer.lr={o.lr}: the schedule decays to min_lr")
    if config.simreg.layer >= m.num_layers:
        raise ConfigError(f"simreg.layer={config.simreg.layer} must be -1 (final hidden states) or a decoder layer "
                          f"0..{m.num_layers - 1}")
    if not _SPLIT.fullmatch(split):
        raise ConfigError(f"data.split={split!r} must be up to three non-negative shares for train, valid, test, "
                          "e.g. 98,1,1")
    if split_shares(split)[0] <= 0:
        raise ConfigError(f"data.split={split!r} gives the training split no share: e.g. 98,1,1")


DATA_PREFIX_EXAMPLE = "e.g. data.prefix=[data/c4/c4-en_text_document] or data.prefix=[30, PREFIX_A, 70, PREFIX_B]"


def _check_data_prefix(prefix: list[str]) -> None:
    """What Megatron's --data-path takes: paths, or weight and path pairs (`[30, a, 70, b]`); none is checked when
    a run is planned (a config read for an export needs no data)."""
    fix = DATA_PREFIX_EXAMPLE
    numbers = [_number(item) for item in prefix]
    if any(not item.strip() for item in prefix):
        raise ConfigError(f"data.prefix={prefix} holds an empty path: {fix}")
    if not any(number is not None for number in numbers):
        return
    weights, paths = numbers[0::2], numbers[1::2]
    if len(prefix) % 2 or None in weights or any(number is not None for number in paths):
        raise ConfigError(f"data.prefix={prefix} mixes weights and paths: give only paths, or weight and path pairs, "
                          + fix)
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"data.prefix={prefix}: the weights must be finite and at least 0, {fix}")
    if not any(w > 0 for w in weights):
        raise ConfigError(f"data.prefix={prefix}: at least one weight must be positive, {fix}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_values(config: Config) -> None:
    _check_ranges(config)
    _check_data_prefix(config.data.prefix)
    if not config.name.strip():
        raise ConfigError("name is empty: it names the run (runs/<name>), e.g. --set name=tiny-llama")
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(config.simreg.weight, str) and config.simreg.weight != "auto":
        raise ConfigError(f"simreg.weight must be a number or 'auto', got {config.simreg.weight!r}")
    if isinstance(config.regularizer.weight, str) and config.regularizer.weight != "auto":
        raise ConfigError(f"regularizer.weight must be a number, 'auto' or null, got {config.regularizer.weight!r}")
    if config.simreg.temperature <= 0:
        raise ConfigError(f"simreg.temperature must be positive, got {config.simreg.temperature}")
    if config.simreg.mode == "full" and config.simreg.chunk_size is not None:
        raise ConfigError("simreg.chunk_size is set but simreg.mode is full: set simreg.mode=chunk, or chunk_size=null")
    m = config.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups} (each query group shares one key/value head)"
        )
    if config.schedule.train_iters is None and config.schedule.train_tokens is None:
        raise ConfigError("set schedule.train_iters or schedule.train_tokens")
    if config.checkpoint.finetune and not config.checkpoint.load:
        raise ConfigError("checkpoint.finetune is set but checkpoint.load is not: name the checkpoint to start from")


def check_layout(config: Config, world_size: int) -> int:
    """Check the parallel layout against `world_size` GPUs (or processes); return the data-parallel size."""
    p, m, t = config.parallel, config.model, config.training
    model_parallel = p.tensor * p.pipeline * p.context
    problems = []
    if world_size % model_parallel:
        problems.append(
            f"world size {world_size} is not divisible by tensor*pipeline*context = {p.tensor}*{p.pipeline}*{p.context}"
        )
    data_parallel = max(world_size // model_parallel, 1)
    if m.num_attention_heads % p.tensor:
        problems.append(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={p.tensor}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if groups % p.tensor:
        problems.append(f"model.num_query_groups={groups} is not divisible by parallel.tensor={p.tensor}")
    if m.num_layers % p.pipeline:
        problems.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}")
    if p.sequence_parallel and m.seq_length % (p.tensor * p.context):
        problems.append(
            f"model.seq_length={m.seq_length} is not divisible by tensor*context={p.tensor * p.context} "
            "(sequence parallel)"
        )
    if p.context > 1 and m.seq_length % (2 * p.context):
        problems.append(f"model.seq_length={m.seq_length} is not divisible by 2*context={2 * p.context}")
    if m.num_experts is None and p.expert > 1:
        problems.append(f"parallel.expert={p.expert} needs an MoE model (model.num_experts)")
    if m.num_experts is not None:
        if m.num_experts % p.expert:
            problems.append(f"model.num_experts={m.num_experts} is not divisible by parallel.expert={p.expert}")
        if (data_parallel * p.context) % p.expert:
            problems.append(
                f"parallel.expert={p.expert} must divide data*context parallel size {data_parallel * p.context}"
            )
        if m.moe_router_topk > m.num_experts:
            problems.append(f"model.moe_router_topk={m.moe_router_topk} exceeds model.num_experts={m.num_experts}")
    if t.global_batch_size % (t.micro_batch_size * data_parallel):
        problems.append(
            f"training.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size*data_parallel = {t.micro_batch_size}*{data_parallel}"
        )
    if config.simreg.layer >= 0:  # SimReg runs on the last pipeline stage, beside the output layer
        first_on_last_stage = m.num_layers - m.num_layers // max(p.pipeline, 1)
        if config.simreg.layer < first_on_last_stage:  # (layers past the model are refused with the ranges)
            problems.append(
                f"simreg.layer={config.simreg.layer} is not on the last pipeline stage, where SimReg runs "
                f"(it holds layers {first_on_last_stage}..{m.num_layers - 1} of {m.num_layers} "
                f"with parallel.pipeline={p.pipeline}): "
                "choose one of those, or -1 for the final hidden states"
            )
    if config.simreg.mode == "chunk" and config.simreg.chunk_size:
        local = m.seq_length // (p.tensor if p.sequence_parallel else 1) // (2 * p.context if p.context > 1 else 1)
        if (p.sequence_parallel or p.context > 1) and local % config.simreg.chunk_size:
            problems.append(
                f"simreg.chunk_size={config.simreg.chunk_size} does not divide the per-rank sequence piece "
                f"of {local} tokens"
            )
    problems += _regularizer_layout_problems(config)
    if problems:
        raise ConfigError(f"parallel layout cannot run on {world_size} processes:\n  - " + "\n  - ".join(problems))
    return data_parallel


def _regularizer_layout_problems(config: Config) -> list[str]:
    """A baseline's chunks must not straddle ranks; a second forward (views: forward) and SCE's momentum encoder
    (target: ema) need one pipeline stage, and the encoder a dense model."""
    settings, p, m = config.regularizer.settings, config.parallel, config.model
    if settings is None:
        return []
    problems = []
    if getattr(settings, "views", None) == "forward" and p.pipeline > 1:
        problems.append("regularizer.views=forward runs a second forward inside the last stage's step: "
                        "it needs parallel.pipeline=1 (or views=dropout)")
    if getattr(settings, "target", None) == "ema" and p.pipeline > 1:
        problems.append("regularizer.target=ema runs the whole momentum encoder inside the last stage's step, which "
                        "holds only its own layers: it needs parallel.pipeline=1 (or target=view)")
    if getattr(settings, "target", None) == "ema" and m.num_experts:
        problems.append("regularizer.target=ema is not supported with experts (a momentum encoder's routers, their "
                        "load-balancing losses and expert-parallel dispatch are untested): use target=view")
    if settings.mode == "chunk" and settings.chunk_size and (p.sequence_parallel or p.context > 1):
        local = m.seq_length // (p.tensor if p.sequence_parallel else 1) // (2 * p.context if p.context > 1 else 1)
        if local % settings.chunk_size:
            problems.append(f"regularizer.chunk_size={settings.chunk_size} does not divide the per-rank sequence "
                            f"piece of {local} tokens")
    return problems
