"""Megatron checkpoints to Hugging Face `LlamaForCausalLM` / `MixtralForCausalLM` folders.

Two formats are read: our CPU loop's (Megatron's `torch` layout, one file per model-parallel rank) and
megatron.training's `torch_dist` (its default on GPUs), which megatron-core itself reshards onto a
single-process model. In the `torch` layout, tensor-parallel shards are merged (column-parallel layers
along their rows, row-parallel ones along their columns, SwiGLU's [gate; up] halves kept apart),
pipeline stages renumbered into one layer list, expert shards renumbered into one expert list.
Megatron's fused QKV holds, per query group, that group's query heads then one key and one value head;
it is split into `q_proj`, `k_proj`, `v_proj`. The padded vocabulary is cut back to the tokenizer's. The
tokenizer files are written beside the weights, so the folder loads offline with `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import tempfile

import torch
import torch.distributed as dist

from megatron_simreg import regularizers
from megatron_simreg.checkpoint import (
    EXPORT,
    FILE,
    Choice,
    check_holds_checkpoint,
    chosen_iteration,
    iteration_dir,
    rank_dir_name,
    read_checkpoint_file,
    verify_checkpoint,
)
from megatron_simreg.config import Config, load_config

COLUMN_PARALLEL = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def load_merged_state(checkpoint_dir: str, cfg: Config, iteration: int | None = None,
                      choice: Choice = EXPORT) -> dict[str, torch.Tensor]:
    """One full (TP=1, PP=1, EP=1) GPTModel state dict from the shards of one checkpoint (`iteration`, else the
    latest), its files checked against their checksums first; `choice` words the offer of another iteration."""
    iteration = chosen_iteration(checkpoint_dir, iteration, choice)
    if iteration is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir!r}: expected latest_checkpointed_iteration.txt and iter_NNNNNNN/ "
            "written by `python -m megatron_simreg.train`"
        )
    verify_checkpoint(checkpoint_dir, iteration, choice, collective=False)
    folder = iteration_dir(checkpoint_dir, iteration)
    if os.path.isfile(os.path.join(folder, "metadata.json")):
        return _load_distributed_checkpoint(folder, cfg)
    p = cfg.parallel
    shards: dict[tuple[int, int, int], dict] = {}
    for tp in range(p.tensor):
        for pp in range(p.pipeline):
            for ep in range(p.expert):
                path = os.path.join(folder, rank_dir_name(tp, pp, ep, p.expert), FILE)
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"checkpoint shard {path} is missing: the checkpoint is partial, or was saved with another "
                        f"layout than the config's (tensor {p.tensor}, pipeline {p.pipeline}, expert {p.expert})"
                    )
                shards[(tp, pp, ep)] = read_checkpoint_file(path, checkpoint_dir, iteration, choice)["model"]
    layers_per_stage = cfg.model.num_layers // p.pipeline
    experts_per_rank = (cfg.model.num_experts or 1) // p.expert
    merged: dict[str, list] = {}
    for (tp, pp, ep), state in sorted(shards.items()):
        for key, tensor in state.items():
            if key.endswith("_extra_state"):
                continue
            is_expert = ".local_experts." in key
            if ep > 0 and not is_expert:
                continue  # dense weights are replicated over expert ranks
            key = _global_key(key, pp * layers_per_stage, ep * experts_per_rank)
            merged.setdefault(key, [None] * p.tensor)[tp] = tensor
    return {key: _merge_tensor_parallel(key, pieces) for key, pieces in merged.items()}


def _load_distributed_checkpoint(folder: str, cfg: Config) -> dict[str, torch.Tensor]:
    """megatron.training's `torch_dist` checkpoint, resharded by megatron-core onto a TP=1/PP=1/EP=1 model."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    with model_on_one_process(cfg, "export a torch_dist checkpoint") as model:
        try:  # reading the content metadata opens the shards too
            sharded = model.sharded_state_dict(metadata=dist_checkpointing.load_content_metadata(folder))
            # weights only: the layers' `_extra_state` (FP8 metadata with TE, nothing locally) differ between the two
            loaded = dist_checkpointing.load({k: v for k, v in sharded.items() if not k.endswith("_extra_state")},
                                             folder)
        except (CheckpointingException, CheckpointException) as error:
            cause = str(error).strip().splitlines()[-1]  # torch's message ends with the failing rank's error
            raise ValueError(f"checkpoint {folder} is incomplete or not of this config's model ({cause}); "
                             "export another iteration (--iteration) or pass the run's --config") from error
    return {key: value.cpu() for key, value in loaded.items() if torch.is_tensor(value)}


def one_process_config(cfg: Config) -> Config:
    """`cfg` as one process holds the whole model (TP = PP = CP = EP = 1), the vocabulary still padded as the
    config's tensor-parallel run pads it, so its embedding has the rows a `torch_dist` checkpoint of the run has."""
    m, p = cfg.model, cfg.parallel
    return dataclasses.replace(
        cfg, model=dataclasses.replace(m, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by * p.tensor),
        parallel=dataclasses.replace(p, tensor=1, pipeline=1, context=1, expert=1, sequence_parallel=False,
                                     distributed_optimizer=False))


@contextlib.contextmanager
def model_on_one_process(cfg: Config, purpose: str, device: str = "cpu"):
    """The whole model of `one_process_config(cfg)`, built on the CPU in a gloo group of one process, to read or
    write a `torch_dist` checkpoint of any layout (megatron-core reshards). On `device="meta"` it takes no memory:
    its sharded keys without weights, for a caller that assigns its own tensors.

    megatron-core's local layers are used whatever the node has (a GPU, Transformer Engine): their sharded keys
    are the ones Transformer Engine's layers write (the fused norms are `linear_qkv.layer_norm_weight` and
    `linear_fc1.layer_norm_weight` in both), and our weight names stay local. The weights are left
    uninitialised: the checkpoint (or the caller) fills them.
    """
    from megatron.core import parallel_state

    from megatron_simreg.model import model_provider, transformer_config_from

    single = one_process_config(cfg)
    config = dataclasses.replace(transformer_config_from(single), transformer_impl="local",
                                 use_cpu_initialization=True, perform_initialization=False)
    if dist.is_initialized():
        raise RuntimeError(f"{purpose} in a process of its own: torch.distributed is in use here")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a group of one, no port
    try:
        parallel_state.initialize_model_parallel()
        with torch.device(device):
            model = model_provider(single, config=config)
        yield model
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _global_key(key: str, layer_offset: int, expert_offset: int) -> str:
    key = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + layer_offset}.", key, count=1)
    return re.sub(
        r"local_experts\.(\d+)\.", lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", key, count=1
    )


def _merge_tensor_parallel(key: str, pieces: list) -> torch.Tensor:
    if len(pieces) == 1 or not key.endswith(COLUMN_PARALLEL + ROW_PARALLEL) or ".router." in key:
        return pieces[0]
    if key.endswith(ROW_PARALLEL):
        return torch.cat(pieces, dim=1)
    if key.endswith("linear_fc1.weight"):  # each rank holds [gate shard; up shard]
        gates, ups = zip(*(piece.chunk(2, dim=0) for piece in pieces))
        return torch.cat(gates + ups, dim=0)
    return torch.cat(pieces, dim=0)


def hugging_face_state(state: dict[str, torch.Tensor], cfg: Config, vocab_size: int) -> dict[str, torch.Tensor]:
    """Rename and split our GPTModel weights into Llama / Mixtral names; a weight left over means an
    architecture these classes cannot hold, which is an error rather than a silently different model.
    A regularizer's state (`regularizers.STATE_KEYS`) is training-only and left out."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.hidden_size // heads
    remaining = {name: tensor for name, tensor in state.items() if not name.startswith(regularizers.STATE_KEYS)}
    take = remaining.pop
    out = {
        "model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab_size],
        "model.norm.weight": take("decoder.final_layernorm.weight"),
    }
    if m.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab_size]
    else:  # tied: Hugging Face reuses embed_tokens (a pipeline's last stage may hold a copy)
        remaining.pop("output_layer.weight", None)
    for i in range(m.num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = take(ours + "self_attention.linear_qkv.weight").view(
            groups, (heads // groups + 2) * head_dim, m.hidden_size
        )
        q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
        out.update({
            theirs + "input_layernorm.weight": take(ours + "input_layernorm.weight"),
            theirs + "self_attn.q_proj.weight": q.reshape(-1, m.hidden_size),
            theirs + "self_attn.k_proj.weight": k.reshape(-1, m.hidden_size),
            theirs + "self_attn.v_proj.weight": v.reshape(-1, m.hidden_size),
            theirs + "self_attn.o_proj.weight": take(ours + "self_attention.linear_proj.weight"),
            theirs + "post_attention_layernorm.weight": take(ours + "pre_mlp_layernorm.weight"),
        })
        if m.num_experts:
            out[theirs + "mlp.gate.weight"] = take(ours + "mlp.router.weight")
            for e in range(m.num_experts):
                expert = f"{ours}mlp.experts.local_experts.{e}."
                gate, up = take(expert + "linear_fc1.weight").chunk(2, dim=0)
                out.update({
                    f"{theirs}mlp.experts.{e}.w1.weight": gate,
                    f"{theirs}mlp.experts.{e}.w3.weight": up,
                    f"{theirs}mlp.experts.{e}.w2.weight": take(expert + "linear_fc2.weight"),
                })
        else:
            gate, up = take(ours + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out.update({
                theirs + "mlp.gate_proj.weight": gate,
                theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": take(ours + "mlp.linear_fc2.weight"),
            })
    if remaining:
        raise ValueError(
            f"the checkpoint has weights a Llama/Mixtral export cannot hold: {sorted(remaining)[:6]}. The exporter "
            "knows RoPE + RMSNorm + SwiGLU models without biases (the shipped configs); check the run's config.yaml"
        )
    return {name: tensor.contiguous() for name, tensor in out.items()}


def hugging_face_config(cfg: Config, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, MixtralConfig

    m = cfg.model
    common = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon, rope_theta=float(m.rotary_base),
        tie_word_embeddings=not m.untie_embeddings_and_output_weights, bos_token_id=tokenizer.bos,
        eos_token_id=tokenizer.eod, torch_dtype="bfloat16" if cfg.training.precision == "bf16" else "float32",
    )  # `architectures` names the model class for loaders that read no model_type (vLLM, pipelines)
    if m.num_experts:
        return MixtralConfig(intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
                             num_local_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                             router_aux_loss_coef=m.moe_aux_loss_coeff,
                             architectures=["MixtralForCausalLM"], **common)
    return LlamaConfig(intermediate_size=m.ffn_hidden_size, attention_bias=False, mlp_bias=False,
                       architectures=["LlamaForCausalLM"], **common)


def export(checkpoint_dir: str, output_dir: str, config_path: str | None = None, iteration: int | None = None,
           overwrite: bool = False, choice: Choice = EXPORT) -> str:
    """Write a Hugging Face model folder (config, safetensors, tokenizer) from one of our checkpoints.

    `choice`: how the caller's user picks another iteration, for messages that offer one.
    The folder is written beside `output_dir` under a temporary name and renamed into place when complete.
    `output_dir` may be new or empty; an earlier export is replaced only with `overwrite` (see `check_output`).
    """
    from safetensors.torch import save_file

    from megatron_simreg.data import build_tokenizer, default_tokenizer_path

    check_output(output_dir, overwrite)
    check_holds_checkpoint(checkpoint_dir, "--checkpoint ")
    config_path = config_path or os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no run config at {config_path}: "
            "pass --config (the resolved config.yaml the run saved beside its checkpoints)"
        )
    cfg = load_config(config_path)
    tokenizer_path = cfg.data.tokenizer or default_tokenizer_path()
    tokenizer = build_tokenizer(tokenizer_path)
    state = hugging_face_state(load_merged_state(checkpoint_dir, cfg, iteration, choice), cfg, tokenizer.vocab_size)
    with _folder_beside(output_dir) as partial:
        hugging_face_config(cfg, tokenizer.vocab_size, tokenizer).save_pretrained(partial)
        save_file(state, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(tokenizer_path, partial)
        _write_marker(partial, checkpoint_dir, iteration)
        _with_umask_modes(partial)
        _replace(output_dir, partial)
    return output_dir


EXPORT_MARKER = "megatron_simreg_export.json"  # lists the files an export wrote: what --overwrite may remove


def check_output(output_dir: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that would lose files: a non-empty folder that is not one of our
    exports, an export holding files it did not write, or an earlier export without `overwrite`; and one the
    finished export cannot be renamed onto (`_check_replaceable`)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output {output_dir} is a file: give a new or empty folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        _check_earlier_export(output_dir, overwrite)
    _check_replaceable(output_dir)


def _check_earlier_export(output_dir: str, overwrite: bool) -> None:
    written = _exported_files(output_dir)
    if written is None:
        raise FileExistsError(
            f"--output {output_dir} is not empty and is not an export (no {EXPORT_MARKER}): give a new or empty "
            "folder; nothing was deleted"
        )
    foreign = sorted(set(os.listdir(output_dir)) - written)
    if foreign:
        raise FileExistsError(
            f"--output {output_dir} is an earlier export but also holds files it did not write "
            f"({', '.join(foreign[:5])}): move them out or give another folder; nothing was deleted"
        )
    if not overwrite:
        raise FileExistsError(f"--output {output_dir} holds an earlier export: pass --overwrite to replace it, or give "
                              "another folder")


def _check_replaceable(output_dir: str) -> None:
    """The export is renamed onto `output_dir` when complete: the working directory (or a folder above it) and
    a mount point (/ among them) cannot be replaced that way."""
    target, here = os.path.realpath(output_dir), os.path.realpath(os.getcwd())
    if os.path.commonpath([target, here]) == target:
        what = "the current directory" if target == here else "a folder above the current directory"
    elif os.path.ismount(target):
        what = "a mount point"
    else:
        return
    raise FileExistsError(f"--output {output_dir} is {what}, which an export cannot replace: give a folder inside it, "
                          f"e.g. --output {os.path.join(output_dir, 'hf')}")


def _exported_files(folder: str) -> set[str] | None:
    try:
        with open(os.path.join(folder, EXPORT_MARKER), encoding="utf-8") as f:
            return set(json.load(f)["files"]) | {EXPORT_MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_marker(folder: str, checkpoint_dir: str, iteration: int | None) -> None:
    record = {"checkpoint": os.path.abspath(checkpoint_dir), "iteration": iteration,
              "files": sorted(os.listdir(folder))}
    with open(os.path.join(folder, EXPORT_MARKER), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


@contextlib.contextmanager
def _folder_beside(output_dir: str):
    """A new temporary folder next to `output_dir` (same filesystem, so the final rename is atomic); removed
    unless it was renamed into place, on Ctrl-C and (under cli.one_line_errors) SIGTERM too. It is locked while
    it is written, so the temporary folders an export killed with -9 left (unlocked) are removed by the next
    export to `output_dir`."""
    target = os.path.abspath(output_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(target)}."
    for name in os.listdir(parent):
        if name.startswith(prefix) and name.endswith(".partial"):
            _remove_if_unlocked(os.path.join(parent, name))
    folder = tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=parent)
    lock = os.open(folder, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield folder
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM under cli.one_line_errors: say what became of it
        stop.args = (f"interrupted; nothing was written to {output_dir} (the partial export was removed)",)
        raise
    finally:
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.close(lock)


def _remove_if_unlocked(folder: str) -> None:
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another export is writing it
    finally:
        os.close(lock)
    shutil.rmtree(folder, ignore_errors=True)


def _with_umask_modes(folder: str) -> None:
    """The modes a plain mkdir and open give (0755/0644 under umask 022): tempfile makes the folder 0700 and
    safetensors its file 0600, which colleagues on a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _replace(output_dir: str, partial: str) -> None:
    """Move the finished export into place; an earlier export (checked by `check_output`) is set aside first
    and removed only once the new one is there."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        os.replace(partial, output_dir)  # a missing or empty folder
        return
    old = partial + ".old"
    os.replace(output_dir, old)
    os.replace(partial, output_dir)
    shutil.rmtree(old)


def _write_tokenizer(tokenizer_path: str, folder: str) -> None:
    from megatron_simreg.hf_tokenizer import write_tokenizer

    write_tokenizer(tokenizer_path, folder)  # checked to encode as training did
