"""The distillation trainer: our logic on top of `accelerate`.

One loop serves four modes: `cache` (teacher top-k read from the teacher cache), `online` (the teacher runs every
step, full-vocabulary loss), `on_policy` (GKD, distill/on_policy.py: as online, on each block's continuation after
its prompt, which the student samples itself in a seeded share `lmbda` of the micro-batches) and `ce`
(cross-entropy on the data alone: the baseline every distilled student is compared with). The data order (and
which micro-batches are sampled, and how) is a pure function of (seed, step), so a checkpoint only needs the step
to know the data position; with optimizer, scheduler and RNG restored, a resumed run ends with the weights an
uninterrupted one would have.

An MoE student's routers add their auxiliary losses (already weighted by their coefficients) to the loss; their
per-layer telemetry goes into each metrics.jsonl row under "moe", the routers get the step's expert load after
each optimizer step (aux_free moves its bias), and `moe_load.png` in the run folder plots expert load per layer.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pocketlm.core import distributed as dist
from pocketlm.distill.config import LossConfig, TrainConfig
from pocketlm.distill.cache import TeacherCache
from pocketlm.distill.checkpoint import (
    latest_checkpoint, load_training_state, read_checkpoint, save_checkpoint, step_dir,
)
from pocketlm.distill.losses import kd_loss
from pocketlm.distill.moe_telemetry import StepTelemetry, plot_expert_load
from pocketlm.distill.on_policy import gkd_batch, is_on_policy
from pocketlm.eval.perplexity import block_perplexity
from pocketlm.models.moe import apply_router_updates
from pocketlm.training import apply_update, autocast, batch_indices, cosine_schedule


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint."""


@dataclass
class TrainResult:
    steps: int
    final_val_perplexity: float | None
    tokens_seen: int
    wall_seconds: float
    tokens_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None


# settings that may change between a run and its resumption without changing what is computed
_RESUME_FREE = {"train.eval_every", "train.save_every", "train.keep_checkpoints", "train.eval_batch_size", "max_memory",
                "trust_remote_code"}  # how a run is watched or loaded, not what it computes


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Leaf keys whose values differ between two nested dicts (ignoring `_RESUME_FREE`)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        name = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, "" if name == "config" else name + ".")
        elif name not in _RESUME_FREE and a != b:
            out.append(f"{name}: {a!r} then, {b!r} now")
    return out


def warn_if_not_sharded(accelerator) -> None:
    """An accelerate config that asks for FSDP on a machine without an accelerator runs as DDP: accelerate
    (1.x, `PartialState`) switches to FSDP only from a GPU-like distributed type, never from MULTI_CPU, so each
    rank holds the whole student. Say so instead of letting the user believe the student is sharded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            accelerator.distributed_type.value != "FSDP":
        warnings.warn(f"FSDP was asked for, but accelerate runs FSDP only on accelerators; this run is "
                      f"{accelerator.distributed_type.value} (every process holds the whole student, gradients "
                      f"are all-reduced as under DDP)", stacklevel=3)


class Trainer:
    def __init__(
        self,
        student,
        *,
        train_blocks: torch.Tensor,
        val_blocks: torch.Tensor | None,
        train_cfg: TrainConfig,
        loss_cfg: LossConfig,
        out_dir: str | os.PathLike,
        teacher=None,
        cache: TeacherCache | None = None,
        tokenizer=None,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
        desc: str = "distill",
    ) -> None:
        from accelerate import Accelerator

        if loss_cfg.mode == "cache" and cache is None:
            raise ValueError("distill.mode is 'cache' but no teacher cache was given")
        if loss_cfg.mode in ("online", "on_policy") and teacher is None:
            raise ValueError(f"distill.mode is {loss_cfg.mode!r} but no teacher was given")
        # positions each block puts in the loss: its continuation in mode on_policy (checked to fit, before any
        # work), else all L - 1
        self.loss_positions = train_blocks.shape[1] - 1
        if loss_cfg.mode == "on_policy":
            self.loss_positions = loss_cfg.on_policy_lengths(train_blocks.shape[1])[1]
        if cache is not None and len(cache) != len(train_blocks):
            raise ValueError(f"teacher cache has {len(cache)} blocks, training data {len(train_blocks)}")
        self.cfg, self.loss_cfg = train_cfg, loss_cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.teacher, self.cache, self.tokenizer = teacher, cache, tokenizer
        self.run_info = run_info or {}
        self.progress, self.desc = progress, desc
        # precision is ours, not accelerate's: its mixed-precision setting is process-global (a second Trainer
        # with another precision in the same process would be refused), an autocast context is not
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        warn_if_not_sharded(self.accelerator)
        if train_cfg.batch_size % self.world:
            raise ValueError(
                f"train.batch_size={train_cfg.batch_size} is the global micro-batch and must split evenly over the "
                f"{self.world} processes; use a multiple of {self.world}"
            )
        decay, no_decay = [], []
        for p in student.parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr,
            betas=train_cfg.betas,
        )
        self.scheduler = cosine_schedule(optimizer, train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio)
        self.student, self.optimizer = self.accelerator.prepare(student, optimizer)
        if teacher is not None:
            teacher.eval().requires_grad_(False).to(self.accelerator.device)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0

    def _autocast(self):
        """bf16 autocast of the forward passes when train.precision is bf16 (fp32 master weights and optimizer)."""
        return autocast(self.accelerator.device.type, self.cfg.precision)

    # ------------------------------------------------------------------------------------------ one step
    def _micro_loss(
        self, ids: torch.Tensor, block_ids: torch.Tensor, telemetry: StepTelemetry, micro_step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.accelerator.device
        ids = ids.to(device)
        mask = None  # every position, except in mode on_policy: the continuation's
        if self.loss_cfg.mode == "on_policy":  # the prompts, with continuations the student samples or the data's
            with self._autocast():
                batch = gkd_batch(self.accelerator.unwrap_model(self.student), ids, block_ids, self.loss_cfg,
                                  seed=self.cfg.seed, micro_step=micro_step)
            ids, mask = batch.ids, batch.mask  # [b, P+N], [b, P+N-1]
        inputs, targets = ids[:, :-1], ids[:, 1:]  # [b, L-1] each
        with self._autocast():
            out = self.student(input_ids=inputs, use_cache=False)
        logits = out.logits  # [b, L-1, V]
        aux_loss = telemetry.add(getattr(out, "aux", None))  # MoE routers' weighted auxiliary losses, summed
        loss, parts = self._task_loss(logits, targets, block_ids, inputs, mask)
        if aux_loss is not None:
            loss = loss + aux_loss
            parts["aux"] = aux_loss.item()
        return loss, parts

    def _task_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, block_ids: torch.Tensor, inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        device = self.accelerator.device
        mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
        lc = self.loss_cfg
        if lc.mode == "ce":
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            return ce, {"ce": ce.item()}
        if lc.mode == "cache":
            cached = self.cache.get(block_ids)  # [b, L, k], [b, L, k], [b, L]
            teacher_kw = {"teacher_topk": tuple(t[:, :-1].to(device) for t in cached)}
        else:  # online, on_policy: the teacher runs in the same precision as the student's forward
            with torch.no_grad(), self._autocast():
                teacher_kw = {"teacher_logits": self.teacher(input_ids=inputs, use_cache=False).logits}
        out = kd_loss(
            logits, targets, mask, loss=lc.loss, temperature=lc.temperature, ce_weight=lc.ce_weight,
            chunk_size=lc.chunk_size, **teacher_kw, **lc.loss_params(),
        )
        return out.loss, {"kd": out.kd.item(), "ce": out.ce.item()}

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.student.train()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        telemetry = StepTelemetry()
        sampled = 0  # micro-batches whose continuations the student sampled (mode on_policy)
        for micro in range(cfg.grad_accum):
            micro_step = self.step * cfg.grad_accum + micro
            # the global micro-batch is a function of (seed, step); each process takes an equal, interleaved share
            # and DDP averages the gradients, so N processes make the step one process makes
            block_ids = batch_indices(len(self.train_blocks), cfg.batch_size, cfg.seed, micro_step)
            local_ids = block_ids[self.rank :: self.world]
            last_micro = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or self.world == 1 else self.accelerator.no_sync(self.student)
            sampled += self.loss_cfg.mode == "on_policy" and is_on_policy(self.loss_cfg.lmbda, cfg.seed, micro_step)
            with sync:
                loss, parts = self._micro_loss(self.train_blocks[local_ids], local_ids, telemetry, micro_step)
                # means over processes (equal shares): what one process would log; a NaN anywhere stops every rank
                loss_value, *part_values = (v / self.world for v in dist.all_reduce_sum([loss.item(), *parts.values()]))
                if not math.isfinite(loss_value):
                    last = latest_checkpoint(self.ckpt_dir)
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at step {self.step + 1} (micro-batch {micro}, blocks "
                        f"{block_ids.tolist()}); stopped without saving. Last good checkpoint: {last or 'none'}. "
                        f"Lower train.lr, check the data, or use train.precision=fp32."
                    )
                self.accelerator.backward(loss / cfg.grad_accum)
            loss_sum += loss_value / cfg.grad_accum
            for k, v in zip(parts, part_values):
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            self.tokens_seen += block_ids.numel() * self.loss_positions  # positions in the loss, all processes
        grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise NonFiniteLossError(
                f"gradient norm is {float(grad_norm)} at step {self.step + 1}; stopped without saving. Last good "
                f"checkpoint: {latest_checkpoint(self.ckpt_dir) or 'none'}. Lower train.lr, check the data, or use "
                f"train.precision=fp32."
            )
        lr = apply_update(self.optimizer, self.scheduler)
        row = {"loss": loss_sum, **totals, "lr": lr, "grad_norm": float(grad_norm)}
        if self.loss_cfg.mode == "on_policy":  # the share of micro-batches sampled, and the tokens sampled (all ranks)
            row["on_policy"] = sampled / cfg.grad_accum
            row["sampled_tokens"] = sampled * cfg.batch_size * self.loss_positions
        if telemetry.load:  # every process applies the same (summed) load, so routers stay identical under DDP
            load = telemetry.reduced_load(lambda t: self.accelerator.reduce(t.to(self.accelerator.device), "sum"))
            apply_router_updates(self.accelerator.unwrap_model(self.student), load)
            row["moe"] = telemetry.row()
        self.step += 1
        return row

    # ------------------------------------------------------------------------------------------ eval / save
    def validate(self) -> float | None:
        if self.val_blocks is None or len(self.val_blocks) == 0:
            return None
        model = self.accelerator.unwrap_model(self.student)
        was_training = model.training
        model.eval()
        res = block_perplexity(model, self.val_blocks, batch_size=self.cfg.eval_batch_size)
        model.train(was_training)
        return res.token_perplexity

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (weights and optimizer are replicated under DDP); the others wait for it."""
        path = step_dir(self.ckpt_dir, self.step)
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.student)
            path = save_checkpoint(
                self.ckpt_dir, self.step, model=model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                scheduler=self.scheduler, keep=self.cfg.keep_checkpoints,
                state={"tokens_seen": self.tokens_seen, "history": self.history, "run": self.run_info,
                       "world_size": self.world},
            )
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, ckpt: str | os.PathLike | None = None) -> bool:
        """Continue from `ckpt` (default: the latest under the run folder); False when there is none."""
        path = Path(ckpt) if ckpt else latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        state = read_checkpoint(path)  # fields checked, every file's checksum verified
        saved_run = state.get("run", {})
        changed = _differences(saved_run, self.run_info)
        if changed:
            raise ValueError(
                f"cannot resume from {path}: the run differs from the one that wrote it ({'; '.join(changed[:6])}); "
                f"resume with the same config, data and teacher, or start a new output_dir"
            )
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        model = self.accelerator.unwrap_model(self.student)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or [m for m in missing if m not in tied]:
            raise ValueError(f"checkpoint {path} does not fit this student (missing {missing}, unexpected {unexpected})")
        if tied:
            model.tie_weights()
        load_training_state(path, self.optimizer, self.scheduler, state)
        self.step = state["step"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self.history = state.get("history", [])
        return True

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        metrics_path = self.out_dir / "metrics.jsonl"
        main = self.accelerator.is_main_process
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # the log holds exactly the steps behind the current weights (rows of a killed run past its checkpoint go)
        if main:
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.history)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not self.progress or not main)
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        last_ckpt = None
        try:
            while self.step < cfg.steps:
                ts, tok_before = time.perf_counter(), self.tokens_seen
                row = self._train_step()
                dt = time.perf_counter() - ts
                row.update(step=self.step, tokens_seen=self.tokens_seen,
                           tokens_per_s=(self.tokens_seen - tok_before) / max(dt, 1e-9))
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    row["val_perplexity"] = self.validate()
                self.history.append(row)
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    last_ckpt = self.save()
        finally:
            bar.close()
        if main:
            plot_expert_load(self.history, self.out_dir / "moe_load.png")
        wall = time.perf_counter() - t0
        val = next((r["val_perplexity"] for r in reversed(self.history) if r.get("val_perplexity") is not None), None)
        return TrainResult(
            steps=self.step, final_val_perplexity=val, tokens_seen=self.tokens_seen, wall_seconds=wall,
            tokens_per_second=(self.tokens_seen - tokens0) / max(wall, 1e-9), history=self.history,
            checkpoint=str(last_ckpt or latest_checkpoint(self.ckpt_dir) or ""),
        )
