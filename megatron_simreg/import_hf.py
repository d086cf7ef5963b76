"""Hugging Face `LlamaForCausalLM`, `MistralForCausalLM` and `MixtralForCausalLM` folders as checkpoints both
training loops start from, for continued pretraining with SimReg.

    python -m megatron_simreg.import_hf --input HF_FOLDER --output runs/llama-import [--config YAML] [--set k=v]

The output is shaped like a run folder, so `train` and `tools/export_hf.py` find everything where they look:

    OUTPUT/config.yaml                    the resolved config: the model section from the folder's config.json,
                                          data.tokenizer = OUTPUT/tokenizer, checkpoint.load = OUTPUT/checkpoints,
                                          checkpoint.finetune = true (weights only: fresh optimizer and schedule)
    OUTPUT/tokenizer/                     the folder's tokenizer files
    OUTPUT/checkpoints/iter_0000000/      the weights, in the layout of `--format`, with checksums.json
    OUTPUT/checkpoints/latest_checkpointed_iteration.txt

Without `--config` the config is configs/base.yaml with the derived model section (seq_length from
max_position_embeddings unless `--set model.seq_length=...`); with it, the YAML's model section is checked
against the folder's, every mismatch named. `--format torch` writes the local loop's layout, one file per
tensor/pipeline/expert rank of `parallel.*`; `--format torch_dist` writes megatron.training's, which it
reshards onto any layout (the default: the loop `train` runs on this machine, megatron.training where CUDA is).

The mapping is the inverse of export_hf.hugging_face_state: q/k/v become Megatron's fused QKV (per query
group: its query heads, then its key and value head), gate and up become fc1's [gate; up] halves, the
embedding is padded with zero rows to the padded vocabulary; tensor-parallel shards are cut as
export_hf._merge_tensor_parallel joins them. Written by hand (megatron-core ships no converter; Megatron-LM's
lives outside the package and Megatron-Bridge pulls a large dependency tree).

Memory: tensors are read from the safetensors shards one at a time, each shard memory-mapped only for that
read (`safe_open`). Each converted tensor (fused, padded, cut for its rank) is copied at once into a scratch file
of the output folder, mapped shared and unlinked (`file_backed`): what the writers then hold (torch.save one
rank's file, megatron-core's dist_checkpointing.save the whole model of a model built on the meta device) is page
cache the kernel writes back and reclaims under pressure, not anonymous memory. The scratch space, about one
rank's file (`torch`) or 1.5x the model (`torch_dist`: fc1's halves are copied apart) of extra disk, is gone with
the tensors, also after a crash (an output folder on tmpfs would keep it all in memory: give one on disk).
Anonymous memory stays at a few of the largest tensors (the embedding read, converted and padded), whatever the
model size; resident memory still counts the mapped pages. Measured with `python -m
megatron_simreg.bench.import_memory --against CHECKOUT` (a child sampled every 2 ms; bf16 Llama, hidden 1024,
shards of 100 MB, TP = 1, 2-core Intel Xeon VM), peaks above a process that only imports the libraries (0.46 GB
anonymous, 1.0-1.1 GB resident, mostly mapped library code), "before" being the importer without the scratch files:

    model (layers, shards)   layout       anonymous: before   after (this code)   resident: before   after
    402 MB (12, 5 shards)    torch              489 MB            111 MB              348 MB       371 MB
                             torch_dist         565 MB            112 MB              435 MB       457 MB
    672 MB (24, 7 shards)    torch              761 MB            111 MB              754 MB       775 MB
                             torch_dist         977 MB            112 MB              980 MB      1002 MB

Anonymous memory grew with the model before (1.1-1.4x it) and is now flat at about one 100 MB shard (the 66 MB
embedding read and padded); resident memory, the mapped scratch pages included, is still about the model. For
a 7B Llama (a 0.26 GB embedding, shards of 5-10 GB) we estimate about 1 GB anonymous instead of 14-20 GB (not
measured at that size).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import tempfile
from typing import NamedTuple

import torch

from megatron_simreg.cli import one_line_errors
from megatron_simreg.export_hf import COLUMN_PARALLEL, ROW_PARALLEL

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
INDEX = "model.safetensors.index.json"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")  # not copied with the tokenizer
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer older transformers saved, recomputed from rope_theta
LINEAR = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # megatron-core's, each with an `_extra_state`


class HFFolder(NamedTuple):
    path: str
    config: object  # transformers' PretrainedConfig
    files: dict[str, str]  # weight name -> the safetensors file holding it


def read_folder(path: str) -> HFFolder:
    """The folder's config and where each weight is; one line for a folder this importer cannot read."""
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--input {path} holds no config.json: give a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as error:
        raise ValueError(f"--input {path}: config.json is not a model config transformers reads "
                         f"({str(error).strip().splitlines()[0][:160]})") from None
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"--input {path} is a {architecture} ({config.model_type}); the importer reads "
                         f"{', '.join(ARCHITECTURES)} folders")
    return HFFolder(path, config, _weight_files(path))


def _weight_files(path: str) -> dict[str, str]:
    from safetensors import safe_open

    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({name for name in weight_map.values() if not os.path.isfile(os.path.join(path, name))})
        if missing:
            raise FileNotFoundError(f"--input {path}: {INDEX} names shard(s) that are not there: "
                                    f"{', '.join(missing[:3])}; download the whole folder")
        return {weight: os.path.join(path, name) for weight, name in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*")) if p.endswith(WEIGHT_FILES))
    found = f"only {', '.join(other[:3])}" if other else "no weights"
    raise FileNotFoundError(f"--input {path} holds {found}: the importer reads safetensors (model.safetensors or "
                            f"{INDEX} and its shards); save the model with save_pretrained(safe_serialization=True)")


def model_settings(hf) -> dict:
    """Our model section (dotted config keys) from a Hugging Face config; unsupported features refused."""
    c = hf.config
    problems = []
    rope = getattr(c, "rope_parameters", None)  # transformers 5; 4 kept rope_theta and rope_scaling apart
    if rope is None:
        rope = {**(getattr(c, "rope_scaling", None) or {}), "rope_theta": c.rope_theta}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        problems.append(f"RoPE scaling ({kind}): our model has plain RoPE")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        problems.append("attention or MLP biases: our model has none")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"activation {c.hidden_act}: our model has SwiGLU (silu)")
    head_dim = getattr(c, "head_dim", None)
    if head_dim and head_dim * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}")
    theta = float(rope["rope_theta"])
    if not theta.is_integer():
        problems.append(f"rope_theta {theta} is not a whole number (model.rotary_base)")
    if problems:
        raise ValueError(f"--input {hf.path} has features the model cannot hold: " + "; ".join(problems))
    settings = {
        "model.num_layers": c.num_hidden_layers, "model.hidden_size": c.hidden_size,
        "model.num_attention_heads": c.num_attention_heads,
        "model.num_query_groups": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "model.ffn_hidden_size": c.intermediate_size, "model.vocab_size": c.vocab_size,
        "model.rotary_base": int(theta), "model.norm_epsilon": float(c.rms_norm_eps),
        "model.untie_embeddings_and_output_weights": not getattr(c, "tie_word_embeddings", False),
        "model.num_experts": None,
    }
    if getattr(c, "num_local_experts", None):
        settings.update({"model.num_experts": c.num_local_experts, "model.moe_router_topk": c.num_experts_per_tok,
                         "model.moe_ffn_hidden_size": c.intermediate_size})
    return settings


def resolve_config(hf: HFFolder, output: str, config_path: str | None, overrides: list[str]):
    """The config the imported checkpoint trains with (see the module docstring), checked against the folder."""
    from megatron_simreg.config import ConfigError, load_config

    derived = model_settings(hf)
    ours = [f"checkpoint.load={os.path.abspath(os.path.join(output, 'checkpoints'))}", "checkpoint.finetune=true"]
    if not _tokenizer_given(overrides):
        ours.append(f"data.tokenizer={os.path.abspath(os.path.join(output, 'tokenizer'))}")
    if config_path is None:
        seq = [f"model.seq_length={hf.config.max_position_embeddings}"]
        name = [f"name={os.path.basename(os.path.abspath(hf.path))}"]
        pinned = [f"{key}={'null' if value is None else value}" for key, value in derived.items()]
        cfg = load_config(BASE_CONFIG, name + seq + pinned + ours + overrides)
    else:
        cfg = load_config(config_path, ours + overrides)
    mismatches = [_mismatch(key, _value(cfg, key), value) for key, value in derived.items()
                  if not _agrees(key, _value(cfg, key), value)]
    if mismatches:
        raise ConfigError(f"the config's model section differs from --input {hf.path}: " + "; ".join(mismatches)
                          + ": set them as the folder has them (or leave out --config to derive the section)")
    window = getattr(hf.config, "sliding_window", None)
    if window is not None and window < cfg.model.seq_length:
        raise ConfigError(
            f"--input {hf.path} attends within a sliding window of {window} tokens, but model.seq_length is "
            f"{cfg.model.seq_length} and our model attends to the whole sequence: train with "
            f"--set model.seq_length={window} (or less), where both agree")
    return cfg


BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.yaml")


def _value(cfg, key: str):
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if key == "model.num_query_groups":
        return value or cfg.model.num_attention_heads
    if key == "model.moe_ffn_hidden_size":
        return value or cfg.model.ffn_hidden_size
    return value


def _agrees(key: str, ours, theirs) -> bool:
    if key == "model.vocab_size":
        return theirs <= ours  # the embedding is padded with zero rows (as Megatron pads it anyway)
    return ours == theirs


def _mismatch(key: str, ours, theirs) -> str:
    if key == "model.vocab_size":
        return f"{key} is {ours} in the config, smaller than the folder's vocabulary of {theirs}"
    return f"{key} is {ours} in the config, {theirs} in the folder"


def hf_names(cfg) -> list[str]:
    """The weights a folder of this model holds (Mixtral's experts under `block_sparse_moe.`, as on the Hub)."""
    m = cfg.model
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if m.untie_embeddings_and_output_weights:
        names.append("lm_head.weight")
    for i in range(m.num_layers):
        layer = f"model.layers.{i}."
        names += [layer + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                      "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight", "self_attn.o_proj.weight")]
        if m.num_experts:
            names.append(layer + "block_sparse_moe.gate.weight")
            names += [f"{layer}block_sparse_moe.experts.{e}.{w}.weight"
                      for e in range(m.num_experts) for w in ("w1", "w2", "w3")]
        else:
            names += [layer + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    return names


def check_weights(hf: HFFolder, cfg) -> None:
    """Every weight the model needs is in the folder, and nothing the model cannot hold."""
    wanted = set(hf_names(cfg))
    present = {_hub_name(name) for name in hf.files}
    missing = sorted(wanted - present, key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"--input {hf.path} is missing weights: {missing[0]}{more}; "
                                "download the whole folder (every shard its index names)")
    tied_copy = {"lm_head.weight"} if not cfg.model.untie_embeddings_and_output_weights else set()
    unknown = sorted(present - wanted - tied_copy - {n for n in present if IGNORED.match(n)}, key=_natural)
    if unknown:
        raise ValueError(f"--input {hf.path} has weights our model cannot hold: {', '.join(unknown[:4])}"
                         f"{' ...' if len(unknown) > 4 else ''} (the importer knows RoPE + RMSNorm + SwiGLU models "
                         "without biases)")


def _hub_name(name: str) -> str:
    """Mixtral's MoE weights by their Hub names (our export writes them under `mlp.`)."""
    return re.sub(r"\.mlp\.(gate|experts)\.", r".block_sparse_moe.\1.", name)


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class _Reader:
    """Tensors by Hub name, each read from its shard when asked for. The shard is opened (memory-mapped) for that
    one read and closed again, so its pages do not stay mapped: the folder is never in memory as a whole."""

    def __init__(self, hf: HFFolder, dtype: torch.dtype):
        self.dtype = dtype
        self.where = {_hub_name(name): (path, name) for name, path in hf.files.items()}

    def __call__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, stored = self.where[name]
        with safe_open(path, framework="pt") as shard:
            return shard.get_tensor(stored).to(self.dtype)


def file_backed(tensor: torch.Tensor, folder: str) -> torch.Tensor:
    """`tensor` copied into a file of `folder`, mapped shared (`torch.from_file`) and unlinked at once: its pages
    are page cache, which the kernel writes back and reclaims under pressure, not anonymous memory, and the disk
    space is freed with the tensor (also on an error, Ctrl-C or a kill: no file is left behind). The writers
    (torch.save, dist_checkpointing.save) read it as any CPU tensor and write the same bytes."""
    handle, path = tempfile.mkstemp(dir=folder, suffix=".import-scratch")
    os.close(handle)
    try:
        mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
    finally:
        os.unlink(path)
    return mapped.view(tensor.shape).copy_(tensor)


def full_tensor(key: str, read: _Reader, cfg, padded_vocab: int) -> torch.Tensor:
    """One of our (TP=1) weights by its global name, from the Hugging Face tensors it is made of."""
    m = cfg.model
    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        source = read("model.embed_tokens.weight" if key.startswith("embedding") else "lm_head.weight")
        padded = source.new_zeros(padded_vocab, source.shape[1])
        padded[: source.shape[0]] = source
        return padded
    if key == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    layer, rest = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key).groups()
    theirs = f"model.layers.{layer}."
    if rest == "self_attention.linear_qkv.weight":
        groups = m.num_query_groups or m.num_attention_heads
        q, k, v = (read(theirs + f"self_attn.{n}_proj.weight").view(groups, -1, m.hidden_size) for n in "qkv")
        return torch.cat([q, k, v], dim=1).reshape(-1, m.hidden_size)
    simple = {"input_layernorm.weight": "input_layernorm.weight", "pre_mlp_layernorm.weight":
              "post_attention_layernorm.weight", "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
              "mlp.linear_fc2.weight": "mlp.down_proj.weight", "mlp.router.weight": "block_sparse_moe.gate.weight"}
    if rest in simple:
        return read(theirs + simple[rest])
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([read(theirs + "mlp.gate_proj.weight"), read(theirs + "mlp.up_proj.weight")])
    expert, part = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight", rest).groups()
    w = f"{theirs}block_sparse_moe.experts.{expert}."
    if part == "linear_fc2":
        return read(w + "w2.weight")
    return torch.cat([read(w + "w1.weight"), read(w + "w3.weight")])


def global_keys(cfg) -> list[str]:
    """Our full model's weight names (TP = PP = EP = 1), as export_hf.load_merged_state returns them."""
    m = cfg.model
    keys = ["embedding.word_embeddings.weight"]
    for i in range(m.num_layers):
        layer = f"decoder.layers.{i}."
        keys += [layer + n for n in ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                                     "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight")]
        if m.num_experts:
            keys.append(layer + "mlp.router.weight")
            keys += [f"{layer}mlp.experts.local_experts.{e}.{n}.weight"
                     for e in range(m.num_experts) for n in ("linear_fc1", "linear_fc2")]
        else:
            keys += [layer + "mlp.linear_fc1.weight", layer + "mlp.linear_fc2.weight"]
    keys.append("decoder.final_layernorm.weight")
    if m.untie_embeddings_and_output_weights:
        keys.append("output_layer.weight")
    return keys


def _tensor_parallel_piece(key: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's shard: the inverse of export_hf._merge_tensor_parallel."""
    if tp == 1 or ".router." in key or not key.endswith(COLUMN_PARALLEL + ROW_PARALLEL):
        return tensor
    if key.endswith(ROW_PARALLEL):
        return tensor.chunk(tp, dim=1)[rank]
    if key.endswith("linear_fc1.weight"):  # each rank holds [gate shard; up shard]
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return tensor.chunk(tp, dim=0)[rank]


def rank_state(cfg, read: _Reader, tp: int, pp: int, ep: int, padded_vocab: int, scratch: str) -> dict:
    """The model part of one rank's local-loop checkpoint file, keyed as that rank's GPTModel.state_dict(); each
    tensor `file_backed` in `scratch` as soon as it is converted."""
    m, p = cfg.model, cfg.parallel
    per_stage, per_rank = m.num_layers // p.pipeline, (m.num_experts or 1) // p.expert
    first, last = pp == 0, pp == p.pipeline - 1
    state = {}
    for key in global_keys(cfg):
        local = key
        if key.startswith("decoder.layers."):
            layer = int(key.split(".")[2])
            if not pp * per_stage <= layer < (pp + 1) * per_stage:
                continue
            local = re.sub(r"layers\.\d+\.", f"layers.{layer - pp * per_stage}.", key, count=1)
            expert = re.search(r"local_experts\.(\d+)\.", key)
            if expert:
                e = int(expert.group(1))
                if not ep * per_rank <= e < (ep + 1) * per_rank:
                    continue
                local = local.replace(f"local_experts.{e}.", f"local_experts.{e - ep * per_rank}.")
        elif key.startswith("embedding.") and not first or key.startswith(("decoder.final", "output")) and not last:
            continue
        piece = _tensor_parallel_piece(key, full_tensor(key, read, cfg, padded_vocab), p.tensor, tp)
        state[local] = file_backed(piece, scratch)
        if local.endswith(tuple(f"{name}.weight" for name in LINEAR)):
            state[local.removesuffix("weight") + "_extra_state"] = None
    if last:
        if not m.untie_embeddings_and_output_weights and not first:  # a tied model's last stage keeps a copy
            embedding = full_tensor("embedding.word_embeddings.weight", read, cfg, padded_vocab)
            piece = _tensor_parallel_piece("output_layer.weight", embedding, p.tensor, tp)
            state["output_layer.weight"] = file_backed(piece, scratch)
        state["output_layer._extra_state"] = None
    return state


def write_torch_layout(cfg, read: _Reader, folder: str) -> None:
    """The local loop's files, rank by rank (checkpoint.py's names and entries, iteration 0)."""
    from megatron_simreg.checkpoint import FILE, rank_dir_name
    from megatron_simreg.resume import model_shape
    from megatron_simreg.run_plan import padded_vocab_size

    p = cfg.parallel
    os.makedirs(folder)
    for tp in range(p.tensor):
        for pp in range(p.pipeline):
            for ep in range(p.expert):
                name = rank_dir_name(tp, pp, ep, p.expert)
                os.makedirs(os.path.join(folder, name))
                state = {"model": rank_state(cfg, read, tp, pp, ep, padded_vocab_size(cfg), folder), "iteration": 0,
                         "consumed_samples": 0, "global_batch_size": cfg.training.global_batch_size,
                         "model_shape": model_shape(cfg)}
                torch.save(state, os.path.join(folder, name, FILE))
                del state


def write_torch_dist(cfg, read: _Reader, folder: str) -> None:
    """megatron.training's layout: our whole model built on the meta device on one process
    (export_hf.model_on_one_process), given the `file_backed` weights converted one by one from the shards, and
    saved by megatron-core's dist_checkpointing, which reshards it onto the config's layout when training loads it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_simreg.cpu_compat import cpu_compat
    from megatron_simreg.export_hf import model_on_one_process, one_process_config
    from megatron_simreg.run_plan import padded_vocab_size

    single = one_process_config(cfg)
    os.makedirs(folder)
    with model_on_one_process(cfg, "write a torch_dist import", device="meta") as model, torch.no_grad():
        state = {key: value for key, value in model.state_dict().items() if key.endswith("_extra_state")}
        state.update((key, file_backed(full_tensor(key, read, single, padded_vocab_size(single)), folder))
                     for key in global_keys(single))
        model.load_state_dict(state, assign=True)  # strict: every weight of the model is one of these
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}  # megatron.training's
        sharded = model.sharded_state_dict(metadata=metadata)
        apply_factories(sharded)  # as save() would: SwiGLU's fc1 becomes two views, its gate and up halves

        def own_file(item):  # megatron-core's writer clones every view up front, anonymous memory until the end
            if isinstance(item, ShardedTensor) and item.data.untyped_storage().nbytes() != item.data.nbytes:
                item.data = file_backed(item.data, folder)
            return item

        dict_list_map_inplace(own_file, sharded)
        with cpu_compat():  # without CUDA, megatron-core's writer would synchronise a GPU
            dist_checkpointing.save({"model": sharded, "iteration": 0, "checkpoint_version": 3.0}, folder,
                                    content_metadata=metadata)


def import_folder(input_dir: str, output: str, config_path: str | None = None, overrides: list[str] | None = None,
                  layout: str | None = None) -> str:
    """Write OUTPUT (see the module docstring) from a Hugging Face folder; every check runs before any write."""
    from megatron_simreg import checksums
    from megatron_simreg.checkpoint import LATEST, iteration_dir
    from megatron_simreg.config import check_layout, save_config

    overrides = overrides or []
    layout = layout or ("torch_dist" if torch.cuda.is_available() else "torch")
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise FileExistsError(f"--output {output} exists and is not an empty folder: give a new one")
    hf = read_folder(input_dir)
    cfg = resolve_config(hf, output, config_path, overrides)
    check_weights(hf, cfg)
    tokenizer = [] if _tokenizer_given(overrides) else _tokenizer_files(hf.path)
    check_layout(cfg, cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context * cfg.parallel.expert)
    checkpoints = os.path.join(output, "checkpoints")
    partial = output.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        if tokenizer:
            os.makedirs(os.path.join(partial, "tokenizer"))
            for path in tokenizer:
                shutil.copy(path, os.path.join(partial, "tokenizer"))
        _check_vocabulary(os.path.join(partial, "tokenizer") if tokenizer else cfg.data.tokenizer, hf, cfg)
        folder = iteration_dir(os.path.join(partial, "checkpoints"), 0)
        dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
        (write_torch_dist if layout == "torch_dist" else write_torch_layout)(cfg, _Reader(hf, dtype), folder)
        checksums.record(folder)
        with open(os.path.join(partial, "checkpoints", LATEST), "w") as f:
            f.write("0")
        save_config(cfg, partial)
        if os.path.isdir(output):
            os.rmdir(output)  # checked empty above
        os.replace(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return checkpoints


def _tokenizer_given(overrides: list[str]) -> bool:
    return any(override.startswith("data.tokenizer=") for override in overrides)


def _tokenizer_files(path: str) -> list[str]:
    """The folder's tokenizer files: everything but weights, their index and the model's config."""
    from megatron_simreg.data.tokenizer import HF_TOKENIZER_FILES

    if not any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
        raise FileNotFoundError(f"--input {path} holds no tokenizer ({' / '.join(HF_TOKENIZER_FILES)}): pass the "
                                "one the model was trained with, --set data.tokenizer=PATH")
    skip = (INDEX, "config.json", "generation_config.json")
    return sorted(p for p in glob.glob(os.path.join(path, "*"))
                  if os.path.isfile(p) and not p.endswith(WEIGHT_FILES) and os.path.basename(p) not in skip)


def _check_vocabulary(tokenizer: str, hf: HFFolder, cfg) -> None:
    from megatron_simreg.data import build_tokenizer

    vocab = build_tokenizer(tokenizer).vocab_size
    if vocab > hf.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {vocab} tokens but --input {hf.path} embeds only "
                         f"{hf.config.vocab_size}: pass the model's own tokenizer (--set data.tokenizer=PATH)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a Hugging Face model folder (config.json, safetensors)")
    parser.add_argument("--output", required=True, help="a new folder: config.yaml, tokenizer/, checkpoints/")
    parser.add_argument("--config", help="a training config whose model section must match the folder's "
                                         "(default: configs/base.yaml with the derived model section)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set parallel.tensor=2 (repeatable)")
    parser.add_argument("--format", choices=("torch", "torch_dist"),
                        help="torch: the local (CPU) loop's layout, one file per parallel rank; torch_dist: "
                             "megatron.training's (default: the loop `train` runs here, torch_dist where CUDA is)")
    args = parser.parse_args(argv)
    with one_line_errors("import_hf"):
        print(import_folder(args.input, args.output, args.config, args.overrides, args.format))


if __name__ == "__main__":
    main()
