"""A small, resumable training loop on accelerate, shared by every system and component.

The loop knows nothing about reward models: a system gives it a module, a dataset, a collate function and a
`step_fn(model, batch) -> (loss, metrics)`. Runs on CPU as is, and on GPUs with `accelerate launch`.
"""

from __future__ import annotations

import dataclasses

import json
from contextlib import nullcontext
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from moerm.atomic import atomic_write_text
from moerm.config import TrainConfig
from moerm.errors import UserError
from moerm.train import distributed, tracking
from moerm.train.checkpoint import (
    load_latest_checkpoint, per_rank_rng, rng_state, save_checkpoint, save_sharded_checkpoint,
)

StepFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: nothing is saved; the message says at which step and what to change."""


class TrainingInterrupted(RuntimeError):
    """Raised by the `stop_after_steps` test hook to simulate a killed run after a checkpoint."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_metrics: dict[str, float]
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def param_groups(groups: Sequence[tuple[nn.Module, float]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups per (module, lr); biases and norms get no weight decay."""
    out: list[dict[str, Any]] = []
    for module, lr in groups:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        if decay:
            out.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if not out:
        raise ValueError("nothing to train: no parameter requires grad")
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes; frozen weights come back from the backbone itself."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


MEGA_BATCH_FACTOR = 50  # grouping by length sorts windows of 50 global batches (Hugging Face's factor)


def epoch_batches(n: int, seed: int, epoch: int, batch_size: int, world: int = 1, rank: int = 0,
                  lengths: Sequence[int] | None = None, mega_factor: int = MEGA_BATCH_FACTOR) -> list[list[int]]:
    """This process's batches of epoch `epoch`: a pure function of its arguments, so a resumed run sees the same.

    The epoch's permutation (from `seed` and `epoch`) is cut into global batches of `world * batch_size` (the tail
    that does not divide by `world` is dropped), and process `rank` takes every world-th index of each, so `world`
    processes with batch b see, step by step, the pairs one process sees with batch `world * b`.

    With `lengths` (one per example) the global batches are grouped by length first, as Hugging Face's
    `group_by_length`: the permutation is split into mega-batches of `mega_factor` global batches, each sorted by
    length (longest first; ties keep the permutation's order), cut into global batches, and the full global batches
    are shuffled (with the same generator); a short last one stays last, as without grouping.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    order = order[: n // world * world]
    gbs = world * batch_size
    if lengths is not None:
        if len(lengths) != n:
            raise ValueError(f"lengths() gave {len(lengths)} lengths for {n} examples")
        mega = mega_factor * gbs
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    global_batches = [order[i : i + gbs] for i in range(0, len(order), gbs)]
    if lengths is not None:
        full = [b for b in global_batches if len(b) == gbs]
        tail = global_batches[len(full):]  # at most one short batch, the last
        global_batches = [full[j] for j in torch.randperm(len(full), generator=g).tolist()] + tail
    return [b[rank::world] for b in global_batches]


def _token_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(real, padded) tokens of a collated batch: its attention mask's ones, and its size; (0, 0) without a mask."""
    mask = batch.get("attention_mask")
    if not torch.is_tensor(mask):
        return 0, 0
    return int(mask.sum()), mask.numel()


class Trainer:
    """Trains `model` with AdamW, warmup + linear decay, grad accumulation, eval, atomic checkpoints, resume."""

    def __init__(
        self,
        model: nn.Module,
        step_fn: StepFn,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        cfg: TrainConfig,
        out_dir: Path,
        groups: Sequence[tuple[nn.Module, float]] | None = None,
        eval_fn: EvalFn | None = None,
        desc: str = "train",
        progress: bool = True,
        stop_after_steps: int | None = None,
    ):
        if len(dataset) == 0:
            raise UserError(f"{desc}: the training set is empty")
        world = distributed.world_size()
        if len(dataset) < world:
            raise UserError(f"{desc}: {len(dataset)} training examples cannot be shared by {world} processes (each "
                             f"needs at least one per epoch): use fewer processes or more data")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.step_fn = step_fn
        self.dataset = dataset
        self.collate = collate
        self.eval_fn = eval_fn
        self.desc = desc
        self.progress = progress and distributed.is_main()  # one progress bar, not one per process
        self.stop_after_steps = stop_after_steps
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                       **tracking.accelerator_kwargs(cfg.report_to, self.out_dir))
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Sharding is ours (train.fsdp, PyTorch FSDP2), not accelerate's plugin: one mechanism, one place.
            raise UserError(f"{desc}: an accelerate {self.accelerator.distributed_type.value} config is not used by "
                             "moerm; launch without it and set train.fsdp.enabled=true for sharded training "
                             "(docs/DISTRIBUTED.md)")
        set_seed(cfg.seed)
        if cfg.lr is None:  # systems resolve it by tuning mode; a bare Trainer takes full fine-tuning's default
            from moerm.encoding.tuning import DEFAULT_LR

            cfg = self.cfg = dataclasses.replace(cfg, lr=DEFAULT_LR["full"])
        groups = groups or [(model, cfg.lr)]
        # FSDP: shard first (parameters become DTensors), then build the optimizer from them: each process holds the
        # optimizer state of its shard of the trainable parameters only
        self.sharded = distributed.shard_model(model, cfg.fsdp) if distributed.fsdp_wanted(cfg.fsdp) else None
        pgroups = param_groups(groups, cfg.weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [names[id(p)] for g in pgroups for p in g["params"]]  # the optimizer's order
        # fused: one kernel for all tensors (CPU and CUDA); measured 115 -> 15 ms per MiniLM step on one CPU thread
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in pgroups for p in g["params"])
        optimizer = torch.optim.AdamW(pgroups, lr=cfg.lr, fused=fused)
        per_rank = len(dataset) // world  # each process's share (the same for all: the tail is dropped)
        self.batches_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.grad_accum))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        if self.sharded is not None:
            self.model, self.optimizer = model, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        # cached features have no padding, so datasets without lengths() train ungrouped
        lengths = getattr(dataset, "lengths", None) if cfg.group_by_length else None
        self.lengths: list[int] | None = list(lengths()) if callable(lengths) else None

    # -- data order: a pure function of (seed, epoch), so a resumed run sees the same batches
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(len(self.dataset), self.cfg.seed, epoch, self.cfg.batch_size,
                             self.accelerator.num_processes, self.accelerator.process_index, self.lengths)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.log(self.accelerator, record)

    def _truncate_metrics(self, step: int) -> None:
        """After resuming from step N, drop log lines the killed run wrote after N (they will be redone)."""
        if not self.accelerator.is_main_process or not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def _evaluate(self, step: int, log: bool = True) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with torch.no_grad(), self._fsdp_autocast():
            metrics = self.eval_fn(model)
        if self.sharded is not None:
            distributed.reshard(self.sharded)
        model.train()
        if log:
            self._log({"step": step, "component": self.desc, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper, whose state dict the checkpoint stores."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _save(self, step: int, epoch: int, next_batch: int, seconds: float,
              window: list[tuple[float, float]] | None = None, tokens: list[list[int]] | None = None) -> None:
        """Every process calls this (the token counts are summed over them); the main one writes."""
        # [[real, padded] since the last log line, [real, padded] of the run], over all processes
        tokens = [[round(v) for v in distributed.sum_across(t)] for t in tokens or [[0, 0], [0, 0]]]
        rng = per_rank_rng(distributed.gather_rows([rng_state()], self.accelerator.num_processes))
        model = self.accelerator.unwrap_model(self.model)
        state = {"epoch": epoch, "next_batch": next_batch, "seconds": seconds, "total_steps": self.total_steps,
                 "window": [list(w) for w in window or []],  # losses since the last log line, so it resumes the same
                 "tokens": tokens, "processes": self.accelerator.num_processes, "batch_size": self.cfg.batch_size,
                 "sharded": self.sharded is not None}
        scaler = self.accelerator.scaler  # fp16 on a GPU: its loss scale must survive a resume for an exact restart
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        if self.sharded is not None and self.cfg.fsdp.checkpoint == "sharded":  # each process writes its shards
            save_sharded_checkpoint(self.ckpt_dir, step, distributed.local_trainable_state(model),
                                    distributed.local_optimizer_state(model, self._raw_optimizer()), self.scheduler,
                                    state, keep=self.cfg.keep_checkpoints, rng=rng)
            return
        if self.sharded is not None:  # gathered from the shards by every process, written by the main one
            weights, opt_state = (distributed.full_trainable_state(model),
                                  distributed.full_optimizer_state(model, self._raw_optimizer()))
        if not self.accelerator.is_main_process:
            return
        if self.sharded is None:
            weights, opt_state = trainable_state(model), self._raw_optimizer().state_dict()
        save_checkpoint(self.ckpt_dir, step, weights, opt_state, self.scheduler, state, keep=self.cfg.keep_checkpoints,
                        rng=rng)

    def _fsdp_autocast(self) -> Any:
        """train.fsdp.mixed_precision=bf16: FSDP gathers bf16 parameters, and autocast keeps the modules that get
        float32 inputs from inside the root (heads after a backbone's float32 features) in step with them."""
        if self.sharded is None or self.cfg.fsdp.mixed_precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=torch.bfloat16)

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """A checkpoint's optimizer state, keyed by index (torch's own) or by parameter name (a sharded run's)."""
        optimizer = self._raw_optimizer()
        if "local" in state:  # this process's shards of a sharded checkpoint (as many processes wrote it)
            if self.sharded is None:
                raise UserError(f"{self.desc}: a sharded checkpoint (train.fsdp.checkpoint: sharded) resumes only "
                                "sharded, on as many processes: set train.fsdp.enabled: true in the run's config.yaml")
            distributed.load_local_optimizer_state(self.accelerator.unwrap_model(self.model), optimizer, state)
            return
        by_name = any(isinstance(k, str) for k in state["state"])
        if by_name and self.sharded is None:  # a sharded run's checkpoint resumed unsharded: name -> index
            index = {n: i for i, n in enumerate(self.param_names)}
            missing = sorted(set(state["state"]) - set(index))
            if missing:
                raise ValueError(f"optimizer state for parameters this model does not train: {missing[:3]}")
            state = {"state": {index[n]: v for n, v in state["state"].items()},
                     "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
            by_name = False
        if not by_name and self.sharded is None:
            optimizer.load_state_dict(state)
            return
        if not by_name:  # an unsharded run's checkpoint resumed sharded: index -> name, in the optimizer's order
            names = self.param_names
            state = {"state": {names[i]: v for i, v in state["state"].items()},
                     "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        distributed.load_named_optimizer_state(self.accelerator.unwrap_model(self.model), optimizer, state)

    def _check_world(self, ckpt: Path, tstate: dict[str, Any]) -> None:
        """A checkpoint written by N processes resumes on M when the data order stays the same: M x batch_size equals
        N x the writer's batch_size, and the epoch keeps as many pairs (its tail is cut to a multiple of the world)."""
        n_old, b_old = tstate.get("processes"), tstate.get("batch_size")
        world, b, n = self.accelerator.num_processes, self.cfg.batch_size, len(self.dataset)
        if n_old is None or b_old is None or (n_old, b_old) == (world, b):
            return
        if n_old * b_old != world * b or n // n_old * n_old != n // world * world:
            raise UserError(
                f"{self.desc}: checkpoint {ckpt} was written by {n_old} processes x batch {b_old} ({n_old * b_old} "
                f"pairs per step); this run has {world} x {b}, so it would not see the same batches and cannot "
                f"resume it exactly. Resume on processes x batch = {n_old * b_old}"
                + (f" (here: train.batch_size: {n_old * b_old // world} in the run's config.yaml, which a resume "
                   f"reads)" if n_old * b_old % world == 0 else "")
                + ", or start again without --resume")

    def _group_size(self, b_idx: int, n_batches: int) -> int:
        """Micro-batches in the accumulation group of batch `b_idx`: `grad_accum`, or fewer for an epoch's last group.

        Each micro-batch's loss is divided by its group's size, so every optimizer step averages its micro-batches
        with equal weights (a short last group is not down-weighted).
        """
        accum = self.cfg.grad_accum
        start = b_idx // accum * accum
        return min(accum, n_batches - start)

    def train(self, resume: bool = False) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        tracking.start(acc, self.out_dir, self.desc, dataclasses.asdict(cfg))
        step, epoch, start_batch, seconds_before = 0, 0, 0, 0.0
        resumed_from = None
        # sharded: the whole state stays in CPU memory; loading it copies each process's shard to its device
        where = acc.device if self.sharded is None else torch.device("cpu")
        found = load_latest_checkpoint(self.ckpt_dir, self._load_optimizer, self.scheduler, where,
                                       warn=lambda msg: tqdm.write(f"warning: {msg}"),
                                       rank=acc.process_index, world=acc.num_processes) if resume else None
        if found is not None:
            ckpt, state, tstate = found
            self._check_world(ckpt, tstate)
            model = acc.unwrap_model(self.model)
            unexpected = sorted(set(state) - set(model.state_dict()))
            if unexpected:
                raise RuntimeError(f"checkpoint {ckpt} does not match the model: {unexpected[:3]}")
            if tstate.get("checkpoint") == "sharded":  # this process's shards (`_load_optimizer` checked sharding)
                distributed.load_local_model_state(model, state)
            elif self.sharded is not None:
                distributed.load_full_model_state(model, state)
            else:
                model.load_state_dict(state, strict=False)
            step, epoch, start_batch = tstate["step"], tstate["epoch"], tstate["next_batch"]
            if acc.scaler is not None and "grad_scaler" in tstate:
                acc.scaler.load_state_dict(tstate["grad_scaler"])
            seconds_before = tstate.get("seconds", 0.0)
            resumed_from = step
            self._truncate_metrics(step)
        elif acc.is_main_process and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log

        window: list[tuple[float, float]] = [tuple(w) for w in tstate.get("window", [])] if found is not None else []
        # real and padded tokens since the last log line and in the whole run; a checkpoint holds the sums over all
        # processes, so after a resume the main process carries them and the others start from zero
        tok_window, tok_run = ([list(t) for t in tstate.get("tokens", [[0, 0], [0, 0]])]
                               if found is not None and acc.is_main_process else [[0, 0], [0, 0]])
        self.model.train()
        t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=step, desc=self.desc, disable=not self.progress or None,
                   dynamic_ncols=True, leave=False)
        last_loss: float | None = None  # the last logged (global) training loss
        last_eval: dict[str, float] = {}
        done = finished_before = step >= self.total_steps  # resumed after its end: nothing to train or log again
        while not done:
            batches = self._epoch_batches(epoch)
            micro_in_step = 0
            for b_idx in range(start_batch, len(batches)):
                batch = self.collate([self.dataset[i] for i in batches[b_idx]])
                real, padded = _token_counts(batch)
                for t in (tok_window, tok_run):
                    t[0] += real
                    t[1] += padded
                batch = _to_device(batch, acc.device)
                last_of_epoch = b_idx == len(batches) - 1
                n_micro = self._group_size(b_idx, len(batches))
                will_step = micro_in_step + 1 == n_micro
                ctx = (nullcontext() if will_step else distributed.grad_sync(self.model, False) if self.sharded is not None
                       else acc.no_sync(self.model))
                with ctx, acc.autocast(), self._fsdp_autocast():
                    loss, metrics = self.step_fn(self.model, batch)
                    acc.backward(loss / n_micro)
                micro_in_step += 1
                value = float(loss.detach())
                if not math.isfinite(value):  # a diverged run is an error, never a saved model
                    raise TrainingDiverged(
                        f"{self.desc}: the training loss is {value} at step {step + 1} (epoch {epoch}); training "
                        f"diverged. Lower the learning rate (train.lr={cfg.lr:g}), keep train.max_grad_norm on "
                        f"(now {cfg.max_grad_norm:g}), or check the data for extreme margins")
                window.append((value, float(metrics.get("accuracy", float("nan")))))
                if not will_step:
                    continue
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                micro_in_step = 0
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == self.total_steps:
                    # every process holds as many micro-batches of equal size: the mean of the means is global
                    mean_loss, mean_acc = distributed.mean_across([sum(w[0] for w in window) / len(window),
                                                                   sum(w[1] for w in window) / len(window)])
                    bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{mean_acc:.3f}")
                    real, padded = (round(v) for v in distributed.sum_across(tok_window))
                    tokens = {"tokens_real": real, "tokens_padded": padded} if padded else {}  # since the last line
                    self._log({"step": step, "component": self.desc, "epoch": epoch, "loss": mean_loss,
                               "accuracy": mean_acc, "lr": self.scheduler.get_last_lr()[0], **tokens})
                    window, last_loss, tok_window = [], mean_loss, [0, 0]
                if cfg.eval_every and step % cfg.eval_every == 0 and step < self.total_steps:
                    last_eval = self._evaluate(step)
                at_end = step >= self.total_steps
                next_epoch, next_batch = (epoch + 1, 0) if last_of_epoch else (epoch, b_idx + 1)
                if cfg.save_every and step % cfg.save_every == 0 and not at_end:
                    self._save(step, next_epoch, next_batch, seconds_before + time.perf_counter() - t0, window,
                               [tok_window, tok_run])
                    if self.stop_after_steps is not None and step >= self.stop_after_steps:
                        bar.close()
                        raise TrainingInterrupted(f"stopped after step {step} (test hook)")
                if at_end:
                    done = True
                    break
            epoch += 1
            start_batch = 0
        bar.close()
        last_eval = self._evaluate(step, log=not finished_before) if self.eval_fn is not None else last_eval
        seconds = seconds_before + time.perf_counter() - t0
        final = {f"eval_{k}": v for k, v in last_eval.items()}
        if window:
            last_loss = distributed.mean_across([sum(w[0] for w in window) / len(window)])[0]
        if last_loss is not None:
            final["train_loss"] = last_loss
        run_real, run_padded = (round(v) for v in distributed.sum_across(tok_run))
        if run_padded:  # over every process and the whole run (a resumed run included)
            final.update({"tokens_real": float(run_real), "tokens_padded": float(run_padded),
                          "padding_fraction": 1.0 - run_real / run_padded})
        self._save(step, epoch, 0, seconds, tokens=[tok_window, tok_run])
        if self.sharded is not None:  # every process holds the whole trained model again, as after DDP
            distributed.unshard_model(self.sharded)
            self.sharded = None
        distributed.barrier()  # no process moves on (to the next component, or to saving) before the checkpoint is written
        tracking.finish(acc)
        return TrainResult(steps=step, seconds=seconds, final_metrics=final, resumed_from=resumed_from)
