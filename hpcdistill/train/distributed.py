"""The trainer role over one or several devices: `single`, `deepspeed` (ZeRO 1/2/3) or `fsdp` (FSDP2).

One `Trainer` per process owns the student's weights, optimizer and checkpoint; the training loop
builds the loss and hands it over as a closure, so the loop reads the same for every strategy:

    trainer = build_trainer(TrainerConfig.from_spec(spec), models.student.model)
    mine, share = trainer.shard(sizes)                  # this rank's items, its share of the tokens
    metrics = trainer.step(lambda: (share * loss_of(mine), named))   # backward -> clip -> AdamW
    trainer.save(paths.checkpoint, step)                # every rank calls; rank 0 publishes

Data parallel, and why the loss is scaled by `share`. Every rank runs the same seeded pipeline up
to the loss (rollout, feedback, scoring: ZeRO-3 and FSDP need every rank inside each forward
anyway), then trains on its own shard of the batch. The objectives normalise by the number of
tokens they see (`objectives.py`: sum_t w_t l_t / N), so rank r's loss over its N_r tokens times
share_r = N_r / N equals its part of sum_t w_t l_t / N over the whole batch; the ranks' parts add
up to the single-process loss. DeepSpeed and FSDP average gradients over ranks, so `step`
multiplies by the world size before backward: the update equals the single-process update up to
float reduction order. Rank 0 alone writes shards and publishes checkpoints.

Launch: the Slurm task's process calls `trainer_processes.launch_trainer_processes`, which starts
`nproc` ranks with
`torch.distributed.run --standalone` (a free rendezvous port, so array tasks sharing a node
never collide) with CUDA_VISIBLE_DEVICES = the trainer role's devices; on the CPU, gloo and
DS_ACCELERATOR=cpu. See docs/trainer.md.

Modules: this one has the strategies and `build_trainer`; `trainer_base` the config, the batch
split and the base class; `trainer_checkpoint` the checkpoint folder; `trainer_processes` the ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from hpcdistill.errors import LaunchError
from hpcdistill.rundir import CHECKPOINT_DCP, CHECKPOINT_DEEPSPEED, CHECKPOINT_STATE
from hpcdistill.train.trainer_base import Trainer, TrainerConfig

log = logging.getLogger(__name__)


class SingleTrainer(Trainer):
    """One process, plain AdamW: what `steps.py` always did. Checkpoint: CHECKPOINT_STATE, the layout
    `steps.save_checkpoint` wrote before the trainer strategies (such checkpoints still load)."""

    strategy = "single"

    def __init__(self, model, config):
        super().__init__(model, config)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)

    def _save_state(self, tmp):
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": self.optimizer.state_dict()}, tmp / CHECKPOINT_STATE)

    def _load_state(self, path):
        state = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedTrainer(Trainer):
    """DeepSpeed ZeRO stage 1, 2 or 3; AdamW (torch's) with the spec's lr, weight decay, clipping.

    Checkpoint: CHECKPOINT_DEEPSPEED as `engine.save_checkpoint` writes it (model states from rank 0, one
    optimizer partition per rank): resume needs the same world size and ZeRO stage.
    """

    strategy = "deepspeed"

    def __init__(self, model, config):
        super().__init__(model, config)
        import deepspeed

        self.zero_stage = config.zero_stage
        dtype = next(model.parameters()).dtype
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # torch's AdamW (not FusedAdam): the same update as the single-process trainer.
            "optimizer": {"type": "AdamW", "params": {"lr": config.lr, "weight_decay": config.weight_decay,
                                                      "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
            "gradient_clipping": config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},  # bf16 params: fp32 master weights in ZeRO
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=self.params, config=ds_config, dist_init_required=False)
        self.model = self.engine.module

    @property
    def shards_parameters(self):
        return self.zero_stage == 3

    def _zero_grad(self):
        self.engine.zero_grad()

    def _before_micro_batch(self, last):
        # DeepSpeed's own accumulation: a variable number of micro-batches per step, so the
        # boundary is set by hand (gradient_accumulation_steps stays 1: no 1/GAS scaling, the
        # parts are already scaled by their token shares) and engine.step() steps at the last.
        self.engine.set_gradient_accumulation_boundary(last)

    def _backward(self, loss):
        self.engine.backward(loss)

    def _clip_and_step(self):
        self.engine.step()  # clips to gradient_clipping, then the optimizer step
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _check_meta(self, path, meta):
        if (meta["world_size"], meta["zero_stage"]) != (self.world_size, self.zero_stage):
            raise LaunchError(f"checkpoint {path} has {meta['world_size']} ranks at ZeRO stage {meta['zero_stage']}; "
                              f"this run has {self.world_size} at stage {self.zero_stage}: resume with the same "
                              "trainer devices and trainer.zero_stage")

    def _save_state(self, tmp):
        self.engine.save_checkpoint(str(tmp / CHECKPOINT_DEEPSPEED), tag="state", save_latest=False)

    def _load_state(self, path):
        loaded, _ = self.engine.load_checkpoint(str(path / CHECKPOINT_DEEPSPEED), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise LaunchError(f"checkpoint {path / CHECKPOINT_DEEPSPEED} could not be loaded by DeepSpeed")

    def full_state_dict(self):
        if self.zero_stage < 3:  # ZeRO-1/2 keep whole (updated) parameters on every rank
            return super().full_state_dict() if self.is_main else {}
        import deepspeed

        out = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if self.is_main:
                    out[name] = param.detach().cpu().clone()
        return out

    def gathered_state_dict(self):
        if self.zero_stage < 3:
            return super().gathered_state_dict()
        import deepspeed

        out = {}
        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                out[name] = param.detach().clone()
        return out


class FSDPTrainer(Trainer):
    """torch FSDP2: every decoder layer and the root are `fully_shard`ed over all ranks.

    The loop calls the decoder body and the lm_head directly (`models.scoring.response_hidden`,
    `project`), not the root's forward, so `step` unshards the root's own parameters (embeddings,
    final norm, tied lm_head) first; FSDP's end-of-backward callback reduce-scatters their
    gradients. Checkpoint: CHECKPOINT_DCP, torch.distributed.checkpoint (sharded, loadable at another
    world size).
    """

    strategy = "fsdp"

    def __init__(self, model, config):
        super().__init__(model, config)
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", model), "layers", None)
        if layers is None:
            raise LaunchError(f"trainer.strategy = 'fsdp' needs a model with .model.layers; "
                              f"{type(model).__name__} has none")
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self._initialise_root()

    @property
    def shards_parameters(self):
        return True

    def _initialise_root(self):
        # FSDP decides the root at the first forward of any sharded module: make it the model.
        device = next(iter(self.model.parameters())).device
        with torch.no_grad():
            self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))

    def _before_forward(self):
        self.model.unshard()  # the root's parameters; the layers unshard themselves in forward

    def _before_micro_batch(self, last):
        self.model.set_requires_gradient_sync(last)  # accumulate locally, reduce-scatter once

    def _after_forward(self):
        self.model.reshard()

    def _clip_and_step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def _save_state(self, tmp):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(tmp / CHECKPOINT_DCP))

    def _load_state(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / CHECKPOINT_DCP))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else {}

    def gathered_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # without cpu_offload every rank receives the full tensors
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))


def build_trainer(config: TrainerConfig, model: torch.nn.Module) -> Trainer:
    """The trainer of `config.strategy` around `model` (already on this rank's device).

    `deepspeed` and `fsdp` need the process group (`init_process_group`) to be up.
    """
    if config.strategy != "single" and not dist.is_initialized():
        raise LaunchError(f"trainer.strategy = {config.strategy!r} runs inside ranks started by "
                          "launch_trainer_processes (torch.distributed.run); no process group is up")
    cls = {"single": SingleTrainer, "deepspeed": DeepSpeedTrainer, "fsdp": FSDPTrainer}[config.strategy]
    trainer = cls(model, config)
    log.info("trainer %s: rank %d of %d", config.strategy, trainer.rank, trainer.world_size)
    return trainer


def trainer_nproc(config: TrainerConfig, devices: Sequence[str]) -> int:
    """Ranks to start: one per trainer GPU, or `nproc` on the CPU; 1 for the single strategy."""
    if config.strategy == "single":
        return 1
    return len(devices) if devices else config.nproc


__all__ = ["TrainerConfig", "Trainer", "SingleTrainer", "DeepSpeedTrainer", "FSDPTrainer",
           "build_trainer", "trainer_nproc"]
