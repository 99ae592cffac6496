"""torchtitan 0.2.2 ``parallelize_fn`` for the muP Llama: TP, AC, per-block compile, FSDP2.

Differences from torchtitan's ``parallelize_llama``:
- the TP plan covers the extra norms (embedding norm, peri-norms), so their gains get
  reduced gradients under sequence parallelism;
- a tied embedding/output weight stays one Parameter: re-tied after TP (both are
  sharded on the vocabulary dimension) and kept in the root FSDP unit with the norms,
  since torch rejects a Parameter shared across FSDP units;
- FSDP collectives on a CPU mesh (gloo, which has no PREMUL_SUM or AVG) are forced to
  plain SUM;
- DDP sums gradients instead of averaging them: the trainer already divides the loss by
  the global token count (torchtitan 0.2.2's own DDP path divides twice);
- context and pipeline parallelism are rejected (the model has no CP attention wrapper
  and no pipelining function).
"""

# No ``from __future__ import annotations``: DDP checks the comm hook's annotations at
# runtime and rejects them as strings.
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp

# The Llama3 op-level selective-AC save list is model-agnostic (matmuls, SDPA kernels,
# reduce-scatter); reuse it rather than keep a copy.
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_compile

from fljob.trainer.model.model import MuPTransformer


def parallelize_mup_llama(
    model: MuPTransformer, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """Apply TP, activation checkpointing, per-block compile and FSDP2/HSDP or DDP.

    Same signature and order as torchtitan 0.2.2's ``parallelize_llama``; the model
    should be on the meta device (the trainer then calls ``to_empty`` and
    ``init_weights``).
    """
    if parallel_dims.cp_enabled or parallel_dims.pp_enabled:
        raise NotImplementedError("the muP Llama supports FSDP/HSDP, DDP and TP only")
    seq_len = job_config.training.seq_len
    if seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(f"training.seq_len {seq_len} is not divisible by "
                         f"{parallel_dims.seq_len_divisor} (sequence parallelism)")
    tied = model.model_args.tie_word_embeddings

    if parallel_dims.tp_enabled:
        tp_mesh = parallel_dims.get_mesh("tp")
        apply_tp(model, tp_mesh, loss_parallel=not job_config.parallelism.disable_loss_parallel)
        maybe_enable_async_tp(job_config, tp_mesh)

    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(model, job_config.activation_checkpoint, model_compile_enabled=compile_enabled,
                 op_sac_save_list=_op_sac_save_list, base_folder=job_config.job.dump_folder)
    if compile_enabled:
        apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        training = job_config.training
        apply_fsdp(
            model, parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            cpu_offload=training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
    elif parallel_dims.dp_replicate_enabled:
        dp_mesh = parallel_dims.get_mesh("dp_replicate")
        if parallel_dims.world_size != dp_mesh.size():
            raise RuntimeError("DDP cannot be combined with other parallelisms")
        apply_ddp(model, dp_mesh, enable_compile=compile_enabled)

    if tied and model.output.weight is not model.tok_embeddings.weight:
        raise RuntimeError("parallelisation untied the output and embedding weights")
    return model


def apply_tp(model: MuPTransformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Megatron-style TP with sequence parallelism on every norm.

    The residual stream between blocks is a plain sequence-sharded tensor; norms whose
    output feeds it (embedding norm, peri-norms) therefore return local tensors, the
    pre-norms return DTensors that PrepareModuleInput all-gathers.
    """
    root_plan: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if model.embedding_norm is not None:
        root_plan["embedding_norm"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, root_plan)  # type: ignore[arg-type]
    if model.model_args.tie_word_embeddings:
        # Both were sharded separately as Shard(0) over the vocabulary: share one.
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(  # (x, rope_cos, rope_sin)
                input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        if model.model_args.use_peri_norm:
            plan["post_attn_norm"] = SequenceParallel(use_local_output=True)
            plan["post_ffn_norm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]


def apply_fsdp(
    model: MuPTransformer,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
) -> None:
    """FSDP2 units: each block; untied also the embedding and [final norm, output].

    Tied, the embedding and output stay in the root unit (one Parameter cannot live in
    two units), which keeps that weight gathered from the start of forward to the end
    of backward. Gradient division is left to the trainer (it divides the loss by the
    global token count), as in torchtitan.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    config: dict[str, object] = {"mesh": dp_mesh, "mp_policy": mp_policy}
    if cpu_offload:
        config["offload_policy"] = CPUOffloadPolicy()
    match reshard_after_forward_policy:
        case "always" | "default":
            reshard = True
        case "never":
            reshard = False
        case _:
            raise ValueError(f"invalid fsdp_reshard_after_forward {reshard_after_forward_policy!r}")

    if not model.model_args.tie_word_embeddings:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard, **config)  # type: ignore[arg-type]
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard, **config)  # type: ignore[arg-type]
    if not model.model_args.tie_word_embeddings:
        # Backward needs them right after forward: only reshard when told "always".
        fully_shard([model.norm, model.output],  # type: ignore[arg-type]
                    reshard_after_forward=reshard_after_forward_policy == "always", **config)
    fully_shard(model, **config)  # type: ignore[arg-type]

    force_sum = dp_mesh.device_type == "cpu"  # gloo: no PREMUL_SUM / AVG reductions
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if force_sum:
                module.set_force_sum_reduction_for_comms(True)


def _allreduce_sum_hook(
    group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: all-reduce SUM (DDP's default averages over ranks)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, enable_compile: bool) -> None:
    """Replicate the model over ``dp_mesh`` with summed gradients."""
    if enable_compile:
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
    model.register_comm_hook(dp_mesh.get_group(), _allreduce_sum_hook)  # type: ignore[operator]
