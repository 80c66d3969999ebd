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

Launch: the Slurm task's process calls `launch_trainer_processes`, which starts `nproc` ranks with
`torch.distributed.run --standalone` (a free rendezvous port, so array tasks sharing a node never
collide) with CUDA_VISIBLE_DEVICES = the trainer role's devices; on the CPU, gloo and
DS_ACCELERATOR=cpu. See docs/trainer.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcdistill.errors import LaunchError

log = logging.getLogger(__name__)

STRATEGIES = ("single", "deepspeed", "fsdp")
CHECKPOINT_FORMAT = 1
LossFn = Callable[[], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainerConfig:
    """What a trainer needs from the spec (`[trainer]` and the optimizer keys of `[train]`)."""

    strategy: str = "single"  # single | deepspeed | fsdp
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    nproc: int = 2  # ranks on the CPU (on GPUs: one rank per trainer device)
    lr: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LaunchError(f"key 'trainer.strategy': {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.zero_stage not in (1, 2, 3):
            raise LaunchError(f"key 'trainer.zero_stage': {self.zero_stage!r}; allowed: 1, 2, 3")

    @classmethod
    def from_spec(cls, spec: Any) -> "TrainerConfig":
        trainer = spec.trainer  # [trainer]: where the student is trained; [train]: the optimizer
        return cls(strategy=trainer.strategy, zero_stage=trainer.zero_stage, nproc=trainer.nproc,
                   lr=spec.train.lr, weight_decay=spec.train.weight_decay, max_grad_norm=spec.train.max_grad_norm)


# ---------------------------------------------------------------------------- process group


def in_trainer_process() -> bool:
    """True inside a rank started by torch.distributed.run (it sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group() -> torch.device:
    """Join the ranks' process group (nccl on GPUs, gloo on the CPU); returns this rank's device."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=30))
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def shard_indices(sizes: Sequence[int], rank: int, world_size: int,
                  groups: Sequence[Any] | None = None) -> tuple[list[int], float]:
    """This rank's item indices and its share of the batch's tokens (sum over ranks = 1).

    sizes[i] = tokens of item i (what the objective normalises by). Items of one group (e.g. one
    problem, whose samples share a baseline in `context_distill`) stay on one rank. Groups go,
    largest first, to the least loaded rank: the same answer on every rank. A rank left without
    items gets one item with share 0, so that every rank runs forward and backward (the
    collectives of ZeRO and FSDP need all ranks) and contributes nothing.
    """
    total = sum(sizes)
    if not sizes:
        return [], 0.0
    keys = list(groups) if groups is not None else list(range(len(sizes)))
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for key in sorted(members, key=lambda k: (-sum(sizes[i] for i in members[k]), members[k][0])):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owned[target] += members[key]
        load[target] += sum(sizes[i] for i in members[key])
    mine = sorted(owned[rank])
    if not mine:
        return [rank % len(sizes)], 0.0
    return mine, load[rank] / max(total, 1)


# ---------------------------------------------------------------------------- trainers


class Trainer:
    """The strategy-independent part: sharding, the step's order, metrics, checkpoint layout."""

    strategy = "single"

    def __init__(self, model: torch.nn.Module, config: TrainerConfig):
        self.config = config
        self.model = model  # the transformers model; forward it as usual (also while sharded)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards_parameters(self) -> bool:
        """True when no rank holds the whole model (FSDP, ZeRO-3): read weights with
        `full_state_dict`, forward the decoder body inside `full_parameters`."""
        return False

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def shard(self, sizes: Sequence[int], groups: Sequence[Any] | None = None) -> tuple[list[int], float]:
        return shard_indices(sizes, self.rank, self.world_size, groups)

    def step(self, loss_fn: LossFn) -> dict[str, float]:
        """zero_grad -> loss_fn() -> backward -> clip -> AdamW step.

        loss_fn returns (this rank's part of the batch loss, metrics already reduced with
        `reduce_metrics`); the parts add up over ranks to the single-process loss.
        """
        self.model.train()
        self._zero_grad()
        self._before_forward()
        loss, metrics = loss_fn()
        # DeepSpeed and FSDP average gradients over ranks; the parts must be summed.
        self._backward(loss * self.world_size)
        grad_norm = self._clip_and_step()
        self.model.eval()
        total = self.all_reduce_sum(loss.detach().float().reshape(1))
        return {**metrics, "train/loss_total": float(total[0]), "train/grad_norm": float(grad_norm)}

    @contextmanager
    def full_parameters(self):
        """Around forwards that call the decoder body and lm_head directly instead of the model
        (`models.scoring.score_rollouts`); enter it outside `torch.inference_mode`."""
        self._before_forward()
        try:
            yield self.model
        finally:
            self._after_forward()

    def reduce_metrics(self, named: dict[str, float], share: float) -> dict[str, float]:
        """Per-token means of each rank's shard -> the batch's mean (weighted by token share)."""
        if self.world_size == 1:
            return dict(named)
        keys = sorted(named)
        values = self.all_reduce_sum(torch.tensor([share * float(named[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, values)}

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        out = values.to(device)
        dist.all_reduce(out)
        return out.cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # checkpoint: <dir>/meta.json + the strategy's files; written under <dir>.tmp, renamed by rank 0

    def save(self, directory: str | os.PathLike, step: int,
             extra: dict[str, Callable[[Path], None]] | None = None) -> None:
        """Trainer state after `step` (every rank calls; the folder appears complete or not at all).

        extra: file name -> writer(path), called on rank 0 for state the loop owns (the EMA
        teacher), published with the trainer's own files; read back with `checkpoint_file`."""
        final = Path(directory)
        tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self._save_state(tmp)
        self.barrier()
        if self.is_main:
            for name, write in (extra or {}).items():
                write(tmp / name)
            meta = {"format": CHECKPOINT_FORMAT, "step": step, "strategy": self.strategy,
                    "world_size": self.world_size, "zero_stage": getattr(self, "zero_stage", None)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load(self, directory: str | os.PathLike) -> int:
        """Restore the state of `directory`; the last completed step, or -1 without a checkpoint."""
        final = _published(Path(directory))
        if final is None:
            return -1
        meta = json.loads((final / "meta.json").read_text())
        meta.setdefault("strategy", "single")  # written by the loop before trainer strategies existed
        if meta["strategy"] != self.strategy:
            raise LaunchError(f"checkpoint {final} was written by trainer.strategy = {meta.get('strategy')!r}; "
                              f"this run uses {self.strategy!r}: resume with the same strategy")
        self._check_meta(final, meta)
        self._load_state(final)
        self.barrier()
        return int(meta["step"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on rank 0 (other ranks get {}); every rank calls."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on EVERY rank, on the model's device (the EMA teacher of
        each rank averages them); every rank calls."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # strategy hooks

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _before_forward(self) -> None:
        pass

    def _after_forward(self) -> None:
        pass

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip_and_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return float(norm)

    def _check_meta(self, path: Path, meta: dict) -> None:
        pass

    def _save_state(self, tmp: Path) -> None:
        raise NotImplementedError

    def _load_state(self, path: Path) -> None:
        raise NotImplementedError


def _published(directory: Path) -> Path | None:
    """The checkpoint folder `save` published last, or None (also after a kill between its renames)."""
    old = directory.with_name(f".{directory.name}.old")
    if not (directory / "meta.json").exists() and (old / "meta.json").exists():
        return old
    return directory if (directory / "meta.json").exists() else None


def checkpoint_file(directory: str | os.PathLike, name: str) -> Path | None:
    """A file `Trainer.save(extra=...)` wrote into the last published checkpoint, or None."""
    final = _published(Path(directory))
    return final / name if final is not None and (final / name).exists() else None


class SingleTrainer(Trainer):
    """One process, plain AdamW: what `steps.py` always did. Checkpoint: state.pt, the layout
    `steps.save_checkpoint` wrote before the trainer strategies (such checkpoints still load)."""

    strategy = "single"

    def __init__(self, model, config):
        super().__init__(model, config)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)

    def _save_state(self, tmp):
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": self.optimizer.state_dict()}, tmp / "state.pt")

    def _load_state(self, path):
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedTrainer(Trainer):
    """DeepSpeed ZeRO stage 1, 2 or 3; AdamW (torch's) with the spec's lr, weight decay, clipping.

    Checkpoint: `ds/` as `engine.save_checkpoint` writes it (model states from rank 0, one
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
        self.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)

    def _load_state(self, path):
        loaded, _ = self.engine.load_checkpoint(str(path / "ds"), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise LaunchError(f"checkpoint {path / 'ds'} could not be loaded by DeepSpeed")

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
    `_project`), not the root's forward, so `step` unshards the root's own parameters (embeddings,
    final norm, tied lm_head) first; FSDP's end-of-backward callback reduce-scatters their
    gradients. Checkpoint: `dcp/`, torch.distributed.checkpoint (sharded, loadable at another
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

        dcp.save(self._state(), checkpoint_id=str(tmp / "dcp"))

    def _load_state(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
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


# ---------------------------------------------------------------------------- launch


def trainer_nproc(config: TrainerConfig, devices: Sequence[str]) -> int:
    """Ranks to start: one per trainer GPU, or `nproc` on the CPU; 1 for the single strategy."""
    if config.strategy == "single":
        return 1
    return len(devices) if devices else config.nproc


def launch_trainer_processes(argv: Sequence[str], devices: Sequence[str], nproc: int,
                             env: dict[str, str] | None = None, grace_s: float = 30.0,
                             received: list[int] | None = None) -> int:
    """Run `python <argv...>` as `nproc` ranks inside this task; returns the ranks' exit status.

    argv: what follows `python`, e.g. ["-m", "hpcdistill.worker", run_dir]. devices: the trainer
    role's GPU ids (`RoleDevices.trainer`), or () on the CPU (gloo, DS_ACCELERATOR=cpu). SIGTERM,
    SIGINT and SIGUSR2 (Slurm's preemption signal) are passed on to the ranks, which are killed
    if they have not ended `grace_s` later; the caller then handles the signal as usual.
    `received`: a list that gets the signals passed on (a caller's handler may return, as
    submitit's does for SIGTERM: the caller then knows the ranks were stopped, not failed).
    """
    environ = dict(os.environ if env is None else env)
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if not devices:
        environ["DS_ACCELERATOR"] = "cpu"
    environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(nproc, 1))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc_per_node={nproc}", "--max_restarts=0", *argv]
    log.info("starting %d trainer ranks on %s: %s", nproc, ",".join(devices) or "cpu", " ".join(cmd))
    # Own session (a signal to this task's group reaches the ranks only through `forward`), but
    # killed with this process: a task killed outright (SIGKILL, a lost node) leaves no ranks.
    proc = subprocess.Popen(cmd, env=environ, start_new_session=True, preexec_fn=_kill_when_parent_dies())
    received = [] if received is None else received

    def forward(signum, _frame):
        received.append(signum)
        _stop(proc, grace_s)

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
    previous = {}
    if _main_thread():
        previous = {s: signal.signal(s, forward) for s in watched}
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            _stop(proc, grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in received:  # let the caller's own handling (submitit's requeue) run
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)
    return code


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to torchrun (it stops its ranks), then SIGKILL to it and its ranks after grace_s.

    torchrun starts each rank in its own session, so killing torchrun's group alone would leave
    the ranks running: they are found through /proc.
    """
    ranks = process_tree(proc.pid)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        for pid in [*ranks, *process_tree(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    except ProcessLookupError:
        pass


def process_tree(pid: int) -> list[int]:
    """Every descendant of `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children.get(child, [])
    return out


def _kill_when_parent_dies() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the process that started it dies (Linux)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    return lambda: prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Inside a rank: SIGKILL when torchrun dies (it starts each rank in its own session, so
    nothing else stops a rank whose torchrun was killed outright)."""
    parent = os.getppid()
    _kill_when_parent_dies()()
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = ["STRATEGIES", "TrainerConfig", "Trainer", "SingleTrainer", "DeepSpeedTrainer", "FSDPTrainer",
           "build_trainer", "init_process_group", "in_trainer_process", "shard_indices", "trainer_nproc",
           "launch_trainer_processes", "process_tree", "die_with_parent"]
