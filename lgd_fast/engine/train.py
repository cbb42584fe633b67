"""The LGD training loop: two stages, SGD Nesterov + cosine with warm-up, checkpoints, resume, validation.

Stage 1 trains the network with the two plain heads (loss = CE(local) + CE(global)); with
``classifier="kernel"`` stage 2 then trains with the combination classifier's loss (SPEC.md section 4),
restarting from ``optim.lr * optim.stage2_lr_scale`` (default 1) with its own cosine decay. In each stage only the
parameters that stage uses require gradients (stage 1: everything but ``kernel_head``; stage 2: everything
but the plain heads), which also keeps DistributedDataParallel free of unused parameters.

``RUN/`` (``config.out``) receives ``config.yaml`` (the resolved config), ``checkpoints/last.pt`` after
every epoch (and every ``checkpoint_every_steps`` steps within one) and ``checkpoints/best.pt`` at the best
validation top-1, ``metrics.json`` (``epoch``, ``val_top1``, ``best_val_top1`` and the per-epoch
``history``), ``curves.png``, ``plan.txt`` (the fast model's execution plan, after its first step) and, with
the ``tensorboard`` package, TensorBoard scalars in ``tensorboard/``. Running again with the same ``out``
resumes from ``last.pt``: at an epoch boundary or mid-epoch, where a mid-epoch checkpoint holds the
position in the epoch's data plan, the epoch's running loss and accuracy sums and the files skipped so far.
The data order and every random choice of an epoch depend on (seed, epoch) only, and the RNG state is
restored, so a resumed deterministic run ends with the same weights as one that was never interrupted. A
non-finite loss stops the run with ``TrainingDiverged`` naming the step; the last good checkpoint is kept.

Distributed: started by ``torchrun``, each process trains on its shard with ``batch_size / world_size``
clips (the loader splits every global batch exactly), gradients are averaged by DDP (gloo on the CPU,
NCCL on GPUs), losses and accuracies are reduced across processes, and only rank 0 validates and writes.
BatchNorm in training mode normalises over the whole global batch: every BatchNorm becomes a synchronised
one (``nn.SyncBatchNorm`` on GPUs, ``lgd_fast.engine.sync_bn.SyncBatchNorm`` with gloo on CPUs), so with
no dropout K processes give the single-process result (``tests/test_train.py`` checks it with 2 processes,
for the reference and the fast model). The fast model's fused convs see the synchronised modules and merge
their per-channel statistics over the group before folding them, forward and backward
(``lgd_fast.ops.conv_bn.sync_stats``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.annotations import read_annotations, read_class_index
from ..data.loader import ClipSpec, VideoClipLoader
from ..models import create_model, model_entry
from .checkpoint import load_checkpoint, read_weights, rng_state, save_checkpoint, set_rng_state, write_text_atomic
from .config import OptimConfig, TrainConfig, config_dict, config_from_dict, save_config

__all__ = ["TrainingDiverged", "Trainer", "build_model", "clip_spec", "train"]

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint that was kept."""


def clip_spec(config: TrainConfig, model_name: str, *, reverse: bool = False) -> ClipSpec:
    """The loader's ClipSpec for ``model_name`` (LGD-2D: TSN segments; LGD-3D: clips) from the data config."""
    d = config.data
    kind = "2d" if model_name.startswith("lgd2d") else "3d"
    return ClipSpec(
        kind=kind, clip_len=d.clip_len, step=d.step, num_segments=d.num_segments, test_clips=d.test_clips,
        test_views=d.test_views, test_crops=d.test_crops, resize_shorter=d.resize_shorter, crop=d.crop,
        flip=d.flip, reverse=reverse,
    )


def build_model(config: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The model the config names, with its dropout (and sketch dimension for the kernel classifier)."""
    m = config.model
    model_entry(m.name)  # a clear error for an unknown name
    options: dict[str, Any] = {"dropout": m.dropout}
    if m.classifier == "kernel":
        options["sketch_dim"] = m.sketch_dim
    if m.fast:  # a deterministic run takes the plan's deterministic default: the same code path on every resume
        options["plan"] = "default" if config.deterministic else None
    return create_model(m.name, num_classes, classifier=m.classifier, fast=m.fast, **options)


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss in float32 at least (16-bit ones under autocast go up; float64 ones stay)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local)
    return torch.device("cpu")


def _set_stage(model: torch.nn.Module, stage: int) -> None:
    """Stage 1: plain heads; stage 2: the combination classifier. Unused parameters stop requiring grads."""
    if hasattr(model, "kernel_head"):
        model.stage = stage
    for name, p in model.named_parameters():
        if name.startswith("kernel_head."):
            p.requires_grad_(stage == 2)
        elif name.startswith(("fc.", "fc_g.")):
            p.requires_grad_(stage == 1 or not hasattr(model, "kernel_head"))
        else:
            p.requires_grad_(True)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_sgd(params: list[torch.nn.Parameter], o: OptimConfig, lr: float) -> torch.optim.SGD:
    """The recipe's SGD (momentum, Nesterov, weight decay from ``o``) at ``lr``, as torch's fused SGD where every
    parameter is on the CPU or CUDA: one kernel over all parameters instead of three ops each (LGD-3D R50's 373
    parameters, 2-core CPU: 12.8 against 47.1 ms a step, ``benchmarks/run_sgd_step.py``, README *Training and
    evaluation*); the same update."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                           fused=fused or None)  # fmt: skip


def match_state_layouts(optimizer: torch.optim.Optimizer) -> int:
    """Puts every per-parameter state tensor of ``optimizer`` shaped like its parameter (SGD's momentum buffers) in
    that parameter's memory layout; returns how many it moved. A loaded state keeps the strides it was saved with,
    and torch's fused SGD walks parameter, gradient and buffer as flat memory, so a buffer saved from a
    channels-last model and loaded for a contiguous one (``--channels-last`` switched between runs of one ``--out``,
    or the other way round) would update each weight with another weight's momentum, with no error."""
    moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    moved += 1
    return moved


class Trainer:
    """Runs ``config`` to the end (or resumes it); ``run()`` returns the final metrics dict."""

    def __init__(self, config: TrainConfig):
        if not config.out:
            raise ValueError("config.out (the run folder, --out) must be set")
        if not config.data.root:
            raise ValueError("config.data.root (the dataset folder, --data) must be set")
        model_entry(config.model.name)  # an unknown name is an error now, before any video is probed
        self.config = config
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = _device(config)
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.distributed = self.world > 1
        self._owns_group = self.distributed and not dist.is_initialized()
        if self._owns_group:
            # GPUs: NCCL for DDP and the BatchNorm statistics, gloo for the run's own CPU tensors (the epoch's
            # sums, the step agreement), which NCCL alone refuses
            dist.init_process_group("cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.optim.batch_size % self.world:
            raise ValueError(f"optim.batch_size {config.optim.batch_size} is not divisible by {self.world} processes")

    # ---- set-up -------------------------------------------------------------------------------------------

    def _data(self):
        c = self.config
        root = Path(c.data.root)
        self.class_names = read_class_index(root / c.data.class_index)
        num_classes = len(self.class_names)
        train_records = read_annotations(root / c.data.train_list, class_index=self.class_names)
        val_records = read_annotations(root / c.data.val_list, class_index=self.class_names)
        spec = clip_spec(c, c.model.name)
        common = dict(spec=spec, backend=c.data.backend, strict=c.data.strict, num_workers=c.data.workers,
                      progress=c.progress and self.rank == 0)
        self.train_loader = VideoClipLoader(
            train_records, batch_size=c.optim.batch_size // self.world, training=True, seed=c.seed,
            shard_id=self.rank, num_shards=self.world, drop_last=False, yield_empty=True, **common,
        )
        self.val_loader = (
            VideoClipLoader(val_records, batch_size=c.optim.batch_size, training=False, **common)
            if self.rank == 0 else None
        )
        return num_classes

    def _optimizer(self, stage: int, steps_per_epoch: int):
        o, c = self.config.optim, self.config
        lr = o.lr if stage == 1 else o.lr * o.stage2_lr_scale
        optimizer = make_sgd([p for p in self.model.parameters() if p.requires_grad], o, lr)
        epochs = c.epochs if stage == 1 else c.stage2_epochs
        warmup = int(round(o.warmup_epochs * steps_per_epoch)) if stage == 1 else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(epochs * steps_per_epoch, warmup))
        return optimizer, scheduler

    def _synchronise_batchnorm(self, model: torch.nn.Module) -> torch.nn.Module:
        """BatchNorm statistics over all processes (the global batch), as one process would compute them.

        The fast model's fused convs find the synchronised modules (``conv_bn.sync_group``) and merge their
        statistics over the group themselves; its other BatchNorms run as these modules."""
        if self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        from .sync_bn import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def _wrap(self):
        run = self.model
        if self.distributed:
            run = torch.nn.parallel.DistributedDataParallel(
                run, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.model.compile:
            run = torch.compile(run)
        self.run_model = run

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """The run; with ``deterministic``, torch's deterministic algorithms for its length (this process's
        setting as it was afterwards: a caller that trains in-process keeps its own)."""
        was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            return self._run()
        finally:
            torch.use_deterministic_algorithms(was[0], warn_only=was[1])

    def _run(self) -> dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)
        num_classes = self._data()
        self.dtype = getattr(torch, c.dtype)
        self.model = build_model(c, num_classes).to(self.device)
        if self.distributed and not c.model.norm_eval:
            self.model = self._synchronise_batchnorm(self.model)
        self.model = self.model.to(dtype=self.dtype)  # after the BatchNorm swap, which makes float32 modules
        if c.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        total_epochs = c.epochs + (c.stage2_epochs if c.model.classifier == "kernel" else 0)
        steps_per_epoch = len(self.train_loader)
        if c.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, c.max_steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -1.0
        start_epoch, self.step = 0, 0
        resume = self.ckpt_dir / "last.pt"
        if self.rank == 0:
            self._remove_partial_checkpoints()
        state = load_checkpoint(resume) if resume.exists() else None
        self.last_saved = "none (no checkpoint was written yet)"
        if state is None and c.model.init_from:
            self._init_from(c.model.init_from)
        stage = 1
        if state is not None:
            self._check_resumable(state, num_classes)
            self.model.load_state_dict(state["model"])
            start_epoch, self.step, stage = state["epoch"], state["step"], state["stage"]
            self.history, self.best_top1 = list(state["history"]), state["best_top1"]
            if start_epoch >= c.epochs and c.model.classifier == "kernel":
                stage = 2
        _set_stage(self.model, stage)
        optimizer, scheduler = self._optimizer(stage, steps_per_epoch)
        # fp16 autocast scales the loss (bf16 and fp32 need no scaling: the scaler is then disabled, a no-op)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp == "fp16")
        if state is not None and state["stage"] == stage:
            optimizer.load_state_dict(state["optimizer"])
            match_state_layouts(optimizer)  # (the model's layout may differ from the saved run's: --channels-last)
            scheduler.load_state_dict(state["scheduler"])
        if state is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        in_epoch = None
        if state is not None:
            set_rng_state(state["rng"])
            in_epoch = state.get("in_epoch")
            self.last_saved = _describe_checkpoint(resume, state)
        if self.rank == 0:
            self._log_start(total_epochs, steps_per_epoch, resumed=state is not None, stage=stage)
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(c, self.out / "config.yaml")
        self._open_tensorboard()
        self._wrap()
        if state is not None and state.get("validation_pending") and self.history:  # it stopped last time
            row = self.history[-1]
            row.update(self._validate())
            if self.rank == 0:
                self._save(start_epoch, stage, optimizer, scheduler, row)
                self._log_epoch(row, total_epochs)
        for epoch in range(start_epoch, total_epochs):
            if c.model.classifier == "kernel" and epoch == c.epochs and stage == 1:
                stage = 2
                _set_stage(self.model, stage)
                optimizer, scheduler = self._optimizer(stage, steps_per_epoch)
                self._wrap()
                if self.rank == 0:
                    logger.info("stage 2 from epoch %d: the kernel classifier's loss, lr %.3g", epoch + 1,
                                scheduler.get_last_lr()[0])
            resume_at = in_epoch if epoch == start_epoch else None
            row = self._train_epoch(epoch, total_epochs, stage, optimizer, scheduler, steps_per_epoch, resume_at)
            if (epoch + 1) % c.eval_every == 0 or epoch + 1 == total_epochs:
                try:
                    row.update(self._validate())
                except BaseException:  # (an error, a Ctrl-C) the epoch's training is kept, without its validation
                    if self.rank == 0:  # (the rerun validates it first: validation_pending)
                        self.history.append(row)
                        self._save(epoch + 1, stage, optimizer, scheduler, row, validation_pending=True)
                        logger.error("validation after epoch %d stopped; the epoch's training is in %s", epoch + 1,
                                     self.last_saved)  # fmt: skip
                    raise
            self.history.append(row)
            if self.rank == 0:
                self._save(epoch + 1, stage, optimizer, scheduler, row)
                self._log_epoch(row, total_epochs)
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._owns_group:
            self._close_group()
        return self._metrics()

    def _close_group(self) -> None:
        """Every process waits for rank 0's last validation and checkpoint; then the group is shut down.

        Gloo's worker threads free each finished collective's tensors, which needs the GIL where a tensor still has
        its Python object; the group's destructor joins those threads. Destroyed by DDP's Reducer (its last owner
        otherwise), it joins them holding the GIL: a deadlock, seen here as a process hung at exit after its last
        step (both threads' stacks read with py-spy). The Python handle of the group releases the GIL in its
        destructor, so it is made the group's last owner: DDP is dropped first, the handle last. A process that
        exited with the group alive aborted instead ("terminate called without an active exception", SIGABRT,
        seen once in CI on rank 1).
        """
        group = dist.group.WORLD
        dist.barrier()
        self.run_model = self.model  # DDP and its Reducer go now, while ``group`` still holds the process group
        dist.destroy_process_group()
        del group  # the last owner: the threads are joined with the GIL released

    def _train_epoch(
        self, epoch, total_epochs, stage, optimizer, scheduler, steps_per_epoch, resume: dict | None = None
    ) -> dict[str, Any]:
        """One epoch; ``resume``: the ``in_epoch`` entry of a mid-epoch checkpoint of this epoch."""
        from tqdm.auto import tqdm

        c = self.config
        self.run_model.train()
        if c.model.norm_eval:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp)
        sums = torch.zeros(3, dtype=torch.float64)  # loss * clips, correct, clips
        done, seconds_before = 0, 0.0  # batches trained in this epoch, and their seconds, before this call
        if resume is not None:
            done, seconds_before = int(resume["batches"]), float(resume["seconds"])
            if self.rank == 0:  # the sums over every process; the others add theirs from here on
                sums = torch.tensor(resume["sums"], dtype=torch.float64)
            carried = resume["skipped"] if self.rank == 0 else ()  # every process's skips so far, kept by rank 0
            self.train_loader.set_epoch(epoch, start_batch=int(resume["position"]), skipped=carried)
        else:
            self.train_loader.set_epoch(epoch)
        every = c.checkpoint_every_steps
        clips_before = sums[2].item()
        start = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{total_epochs} (stage {stage})",
                   unit="step", disable=not (c.progress and self.rank == 0), leave=False)  # fmt: skip
        for batch in self.train_loader:
            if done >= steps_per_epoch:
                break
            if not self._every_process_has(batch):
                continue
            clips = batch.clips.to(self.device, self.dtype, non_blocking=True)
            if c.model.channels_last:
                clips = clips.contiguous(memory_format=torch.channels_last_3d)
            labels = batch.labels.to(self.device)
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                out = self.run_model(clips)
                if stage == 1:
                    local, global_ = out
                    loss = F.cross_entropy(_wide(local), labels) + F.cross_entropy(_wide(global_), labels)
                    logits = local
                else:
                    logits = out
                    loss = F.cross_entropy(_wide(logits), labels)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {self.step + 1} (epoch {epoch + 1}, stage {stage}); "
                    f"stopping. Last good checkpoint: {self.last_saved}"
                )
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c.optim.grad_clip:
                self.scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               c.optim.grad_clip)
            self.scaler.step(optimizer)  # skipped (and the scale lowered) if an fp16 gradient overflowed
            self.scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            self.step += 1
            done += 1
            n = labels.numel()
            sums += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n], dtype=torch.float64)
            elapsed = time.perf_counter() - start
            rate = (sums[2].item() - clips_before) * self.world / elapsed
            bar.set_postfix(loss=f"{loss.item():.3f}", clips_s=f"{rate:.1f}", lr=f"{lr:.2e}")
            bar.update(1)
            if self.tensorboard is not None:
                self.tensorboard.add_scalar("train/loss_step", loss.item(), self.step)
                self.tensorboard.add_scalar("train/lr", lr, self.step)
            if self.step == 1 and self.rank == 0:
                self._write_plan()
            if every and self.step % every == 0 and done < steps_per_epoch:
                self._save_in_epoch(epoch, stage, optimizer, scheduler, done, sums, elapsed + seconds_before)
        bar.close()
        if self.distributed:
            dist.all_reduce(sums)
        seconds = time.perf_counter() - start + seconds_before
        clips = max(sums[2].item(), 1.0)
        skipped = len(self._every_process_skipped())
        return {
            "epoch": epoch + 1,
            "stage": stage,
            "step": self.step,
            "train_loss": sums[0].item() / clips,
            "train_top1": sums[1].item() / clips,
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": seconds,
            "clips_per_s": clips / seconds,
            "skipped_clips": skipped,
            "dropped_files": len(self.train_loader.dropped),
        }

    def _every_process_skipped(self) -> list[tuple[str, str]]:
        """The clips skipped so far in this epoch by every process (each reads its own part of the data), rank 0's
        first; a collective: every process calls it at the same point."""
        if not self.distributed:
            return list(self.train_loader.skipped)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, [tuple(item) for item in self.train_loader.skipped])
        return [item for part in parts for item in part]

    def _every_process_has(self, batch) -> bool:
        """Whether this step trains: every process has a batch for it. A process whose part of the global batch
        was unreadable throughout (``None`` from the loader) makes every process skip the step, as DDP's gradient
        reduction and the sums' all-reduce need every process in every step (one process a step short of the
        others would hang the run)."""
        if not self.distributed:
            return batch is not None
        missing = torch.tensor([float(batch is None)])
        dist.all_reduce(missing)  # (a CPU tensor: gloo, beside NCCL on GPUs)
        if missing.item() and self.rank == 0:
            logger.warning("a step skipped on every process: %d of %d had no readable clip of its part of the batch "
                           "(the others' clips of it unused)", int(missing.item()), self.world)  # fmt: skip
        return missing.item() == 0

    # ---- what the run says: the log, TensorBoard, the plan -------------------------------------------------

    def _remove_partial_checkpoints(self) -> None:
        """A run killed while writing a checkpoint, metrics.json or config.yaml leaves its temporary file (the file
        itself is intact)."""
        for folder in (self.ckpt_dir, self.out):
            for leftover in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
                leftover.unlink()
                logger.info("removed %s, a file a killed run was still writing", leftover)

    def _log_start(self, total_epochs, steps_per_epoch, *, resumed: bool, stage: int) -> None:
        c = self.config
        epochs = f"{c.epochs} epoch(s)"
        if c.model.classifier == "kernel":
            epochs = f"{c.epochs} stage-1 + {c.stage2_epochs} stage-2 epoch(s) (stage2_epochs) = {total_epochs} epochs"
        logger.info(
            "training %s%s on %s: %s of %d steps; %d training videos (%d left out), %d validation videos, "
            "%d classes; batch %d%s; run folder %s", c.model.name, " (fast)" if c.model.fast else "",
            self.device, epochs, steps_per_epoch, len(self.train_loader.videos), len(self.train_loader.dropped),
            len(self.val_loader.videos) if self.val_loader is not None else 0, len(self.class_names),
            c.optim.batch_size, f" over {self.world} processes" if self.distributed else "", self.out,
        )  # fmt: skip
        if not resumed:
            logger.info("starting a new run (no %s)", self.ckpt_dir / "last.pt")
        else:
            logger.info("resuming from %s: stage %d", self.last_saved, stage)
        if c.model.fast:
            plan = self.model.execution_plan
            layers = plan.layers()
            mode = layers[0][1].mode if layers else "-"
            logger.info("fast model: %d planned layers (plan %s); each decided on first use, written to %s after "
                        "the first step", len(layers), mode, self.out / "plan.txt")  # fmt: skip

    def _write_plan(self) -> None:
        if not self.config.model.fast:
            return
        path = self.out / "plan.txt"
        path.write_text(str(self.model.execution_plan) + "\n")
        logger.info("execution plan of the first training step: %s", path)

    def _log_epoch(self, row, total_epochs) -> None:
        val = f", val top-1 {row['val_top1']:.3f}" if row.get("val_top1") is not None else ""
        logger.info("epoch %d/%d (stage %d): train loss %.4f, train top-1 %.3f%s, %.1f clips/s; checkpoint %s",
                    row["epoch"], total_epochs, row["stage"], row["train_loss"], row["train_top1"], val,
                    row["clips_per_s"], self.last_saved)  # fmt: skip

    def _open_tensorboard(self) -> None:
        """TensorBoard scalars in RUN/tensorboard (config ``tensorboard``: auto = where the package imports)."""
        self.tensorboard = None
        if self.rank != 0 or self.config.tensorboard == "false":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            if self.config.tensorboard == "true":
                message = f"tensorboard=true needs the tensorboard package ({err}): pip install tensorboard"
                raise ValueError(message) from err
            logger.info("no TensorBoard scalars: the tensorboard package is not installed (pip install tensorboard)")
            return
        # purge_step: a resumed run drops what a killed one logged after its checkpoint
        self.tensorboard = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)
        logger.info("TensorBoard scalars: %s", self.out / "tensorboard")

    def _validate(self) -> dict[str, Any]:
        if self.rank != 0:
            return {}
        from .evaluate import evaluate

        c = self.config
        result = evaluate(self.model, self.val_loader, num_classes=len(self.class_names), device=self.device,
                          amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp), progress=c.progress)
        return {"val_top1": result.top1, "val_top5": result.top5, "val_videos": result.num_videos}

    def _payload(self, epoch, stage, optimizer, scheduler, in_epoch=None) -> dict[str, Any]:
        """A checkpoint; ``epoch`` counts finished epochs, ``in_epoch`` is where the next one stands (or None)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} unless amp is fp16
            "rng": rng_state(),
            "epoch": epoch,
            "step": self.step,
            "stage": stage,
            "in_epoch": in_epoch,
            "history": self.history,
            "best_top1": self.best_top1,
            "config": config_dict(self.config),
            "class_names": self.class_names,
        }

    def _save_in_epoch(self, epoch, stage, optimizer, scheduler, done, sums, seconds) -> None:
        """``last.pt`` in the middle of epoch ``epoch`` (0-based) after ``done`` of its batches."""
        totals = sums.clone()
        if self.distributed:  # every process is here at the same step; rank 0 keeps the sums over all of them
            dist.all_reduce(totals)
        skipped = self._every_process_skipped()
        if self.rank != 0:
            return
        in_epoch = {
            "batches": done,
            "of": self.steps_per_epoch,
            "processes": self.world,
            "position": self.train_loader.position,
            "sums": totals.tolist(),
            "seconds": seconds,
            "skipped": [list(item) for item in skipped],
        }
        if self.tensorboard is not None:  # what TensorBoard holds is what the checkpoint holds
            self.tensorboard.flush()
        path = save_checkpoint(self._payload(epoch, stage, optimizer, scheduler, in_epoch), self.ckpt_dir / "last.pt")
        self.last_saved = _describe_checkpoint(path, {"epoch": epoch, "step": self.step, "in_epoch": in_epoch})
        logger.info("checkpoint %s", self.last_saved)

    def _save(self, epoch, stage, optimizer, scheduler, row, *, validation_pending: bool = False) -> None:
        payload = self._payload(epoch, stage, optimizer, scheduler)
        payload["validation_pending"] = validation_pending  # its validation stopped: the rerun runs it first
        top1 = row.get("val_top1")
        if top1 is not None and top1 > self.best_top1:
            self.best_top1 = payload["best_top1"] = top1
            save_checkpoint(payload, self.ckpt_dir / "best.pt")
        path = save_checkpoint(payload, self.ckpt_dir / "last.pt")
        self.last_saved = _describe_checkpoint(path, payload)
        if self.tensorboard is not None:
            for key in ("train_loss", "train_top1", "val_top1", "val_top5", "clips_per_s", "lr"):
                if row.get(key) is not None:
                    self.tensorboard.add_scalar(f"epoch/{key}", row[key], epoch)
            self.tensorboard.flush()
        metrics = self._metrics()
        write_text_atomic(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _plot_curves(self.history, self.out / "curves.png")

    def _metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        evaluated = [r for r in self.history if "val_top1" in r]
        return {
            "epoch": last.get("epoch", 0),
            "stage": last.get("stage"),
            "val_top1": evaluated[-1]["val_top1"] if evaluated else None,
            "best_val_top1": max((r["val_top1"] for r in evaluated), default=None),
            "num_classes": len(self.class_names),
            "history": self.history,
        }

    def _check_resumable(self, state, num_classes) -> None:
        saved = config_from_dict(state["config"])
        now = self.config
        for key in ("name", "classifier"):
            if getattr(saved.model, key) != getattr(now.model, key):
                raise ValueError(
                    f"{self.ckpt_dir / 'last.pt'} was written for model.{key}={getattr(saved.model, key)!r}, this "
                    f"run asks for {getattr(now.model, key)!r}: use another --out to start a new run"
                )
        if len(state["class_names"]) != num_classes:
            raise ValueError(f"{self.ckpt_dir / 'last.pt'} has {len(state['class_names'])} classes, the data "
                             f"{num_classes}: use another --out to start a new run")
        pairs = enumerate(zip(state["class_names"], self.class_names, strict=True))
        renamed = [f"label {i}: {a!r} -> {b!r}" for i, (a, b) in pairs if a != b]
        if renamed:  # the same count, other meanings: every label the model learnt would now name another class
            shown = "; ".join(renamed[:3]) + ("; ..." if len(renamed) > 3 else "")
            raise ValueError(f"{self.ckpt_dir / 'last.pt'} was trained with other class names ({shown}): use "
                             "another --out to start a new run")  # fmt: skip
        in_epoch = state.get("in_epoch")
        if in_epoch:  # the rest of an epoch is its remaining batches: the same plan, cut the same way
            then = {"optim.batch_size": saved.optim.batch_size, "seed": saved.seed, "steps per epoch": in_epoch["of"],
                    "processes": in_epoch.get("processes", self.world)}  # fmt: skip
            now_ = {"optim.batch_size": now.optim.batch_size, "seed": now.seed, "steps per epoch": self.steps_per_epoch,
                    "processes": self.world}  # fmt: skip
            changed = [f"{k} {then[k]} -> {now_[k]}" for k in then if then[k] != now_[k]]
            if changed:
                raise ValueError(f"{_describe_checkpoint(self.ckpt_dir / 'last.pt', state)} stopped within an epoch, "
                                 f"whose remaining batches need the settings it ran with, but {', '.join(changed)}: "
                                 "resume with them to finish the epoch, or use another --out")  # fmt: skip

    def _init_from(self, path: str) -> None:
        """Fine-tuning: loads every tensor of ``path`` whose name and shape fit; heads of another label set
        keep their initialisation. Logs what was loaded, replaced and left."""
        source = read_weights(path)
        own = self.model.state_dict()
        loaded, replaced, unexpected = {}, [], []
        for key, value in source.items():
            key = key.removeprefix("module.")
            if key not in own:
                unexpected.append(key)
            elif own[key].shape != value.shape:
                replaced.append(f"{key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
            else:
                loaded[key] = value
        missing = [k for k in own if k not in loaded and not any(k in r for r in replaced)]
        if not loaded:  # fine-tuning asked for, training from scratch would follow: an error, not a warning
            names = ", ".join(list(source)[:3])
            raise ValueError(f"model.init_from {path}: none of its {len(source)} tensors fits {self.config.model.name} "
                             f"by name and shape (its first: {names}); nothing to fine-tune from")  # fmt: skip
        self.model.load_state_dict(loaded, strict=False)
        if self.rank == 0:
            logger.warning(
                "init from %s: %d tensors loaded; replaced (new shape, kept initialised): %s; not in the "
                "checkpoint: %s; unused: %s", path, len(loaded), replaced or "none", missing or "none",
                unexpected or "none",
            )
        self.init_report = {"loaded": len(loaded), "replaced": replaced, "missing": missing, "unexpected": unexpected}


def _describe_checkpoint(path, state) -> str:
    """``PATH (epoch 2)`` after an epoch, ``PATH (epoch 3, batch 2 of 4, step 10)`` within one."""
    in_epoch = state.get("in_epoch")
    if not in_epoch:
        return f"{path} (epoch {state['epoch']})"
    return f"{path} (epoch {state['epoch'] + 1}, batch {in_epoch['batches']} of {in_epoch['of']}, step {state['step']})"


def stage_spans(history: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(stage, first epoch, last epoch) of each run of consecutive history rows in the same stage."""
    spans: list[tuple[int, int, int]] = []
    for row in history:
        if spans and spans[-1][0] == row["stage"]:
            spans[-1] = (row["stage"], spans[-1][1], row["epoch"])
        else:
            spans.append((row["stage"], row["epoch"], row["epoch"]))
    return spans


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.plot(epochs, [r["train_top1"] for r in history], marker="o", label="train clips top-1")
    val = [(r["epoch"], r["val_top1"]) for r in history if "val_top1" in r]
    if val:
        ax_acc.plot(*zip(*val, strict=True), marker="s", label="val videos top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        for stage, first, last in stage_spans(history):
            if stage == 2:  # the kernel classifier's loss is another loss: the curves jump here
                ax.axvspan(first - 0.5, last + 0.5, color="tab:orange", alpha=0.12, lw=0)
                ax.axvline(first - 0.5, color="tab:orange", ls="--", lw=1)
                ax.text(first - 0.4, 0.98, "stage 2: kernel classifier", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=8, color="tab:orange")  # fmt: skip
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the run ``config`` describes; returns the final metrics."""
    return Trainer(config).run()
