"""CLoVE pretraining with accelerate.

    accelerate launch -m training.pretrain --recipe clove_r50_in1k_400ep data=/data/imagenet/train
    python -m training.pretrain --recipe demo output_dir=runs/demo max_steps=50

The loop, per optimizer step: schedules (lr, teacher momentum from the global step) -> for each micro-batch:
photometric augmentation on the device, forward + loss, backward -> guard -> optimizer step -> teacher EMA ->
logging -> checkpoint -> preemption. See ``training/config.py`` for every setting and ``training/recipes/`` for the
paper's recipes.

Faults the loop survives (``docs/reliability.md`` lists how each is tested):

* bad image files: replaced by the next usable file and listed in ``<output_dir>/quarantine.tsv``
  (:class:`training.data.Quarantine`); above ``max_bad_fraction`` the run stops (:class:`BadDataError`);
* preemption: a signal in ``preemption_signals`` (SIGTERM, SIGUSR1) on any process makes every process finish the
  current step, write a checkpoint and return (exit status :data:`PREEMPTED_EXIT_CODE` from the command line);
  a relaunch with ``resume=auto`` continues bitwise as if never stopped;
* non-finite numbers: before the optimizer moves, every process agrees on whether any loss, gradient or BatchNorm
  statistic is NaN or infinite; ``nonfinite_loss=stop`` raises :class:`NonFiniteLossError` at that step on every
  process, ``skip`` drops the step (weights, teacher, buffers and queue as before it). Skipped steps, these and
  fp16 GradScaler overflows, are counted; ``max_skipped_steps_in_row`` of them in a row stop the run
  (:class:`SkippedStepsError`) instead of letting the loss scale decay to nothing;
* a crash at any point: checkpoints are atomic and verified, and resume never unpickles anything unsafe
  (:mod:`training.checkpoint`).

The guard and the preemption flag share one all-reduce per optimizer step (one host synchronization).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clove_timm.loss import CLoVELoss
from clove_timm.model import CLoVEModel
from clove_timm.monitor import collapse_stats
from clove_timm.optim import LARS, param_groups_for_lars
from clove_timm.schedules import learning_rate, scaled_lr, teacher_momentum
from clove_timm.views import MultiCropGeometry, MultiCropPhotometric
from training import checkpoint as ckpt
from training.config import BatchPlan, PretrainConfig, load_config, plan_batches
from training.data import (
    QUARANTINE_FILE,
    BadDataError,
    ImageFolderSource,
    MultiCropDataset,
    ProceduralSource,
    Quarantine,
    StepSampler,
    WebDatasetSource,
    derived_generator,
    steps_per_epoch,
    worker_init,
)
from training.faults import NONFINITE_WHAT, NonFiniteLossError, SkippedStepsError, StopRequest, any_nonfinite

_logger = logging.getLogger("training.pretrain")

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL ("temporary failure, try again"): relaunch with resume=auto

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "BadDataError",
    "NonFiniteLossError",
    "SkippedStepsError",
    "StopRequest",
    "TrainResult",
    "main",
]


@dataclass
class TrainResult:
    """What a finished run leaves in memory (for tests and notebooks) besides its files."""

    export_dir: Path
    step: int
    model: CLoVEModel
    optimizer: torch.optim.Optimizer
    num_processes: int
    preempted: bool = False  # stopped by a preemption signal after its checkpoint; nothing was exported
    skipped_steps: int = 0  # optimizer steps dropped over the whole run (non-finite values, fp16 overflow)


def parse_args(argv: Sequence[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=None, help="recipe name in training/recipes/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value (values parsed as YAML)")
    args = parser.parse_args(argv)
    return args.recipe, args.overrides


def git_revision() -> str:
    """Commit of the source tree the recipe runs from, with ``-dirty`` for uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def build_source(config: PretrainConfig, plan: BatchPlan, accelerator: Accelerator, start_step: int):
    """The data set of this process and the number of samples in one epoch."""
    geometry = MultiCropGeometry(
        global_size=config.global_size,
        local_size=config.local_size,
        num_local=config.num_local,
        global_scale=config.global_scale,
        local_scale=config.local_scale,
    )
    if config.data.startswith("wds:"):
        epoch_len = config.streaming_samples_per_epoch
        dataset = WebDatasetSource(
            config.data.removeprefix("wds:"),
            geometry,
            seed=config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            start_epoch=start_step // steps_per_epoch(epoch_len, plan.global_batch),
        )
        return dataset, epoch_len
    if config.data == "procedural":
        source = ProceduralSource(
            config.procedural_images,
            image_size=config.procedural_image_size,
            num_classes=config.procedural_classes,
            seed=config.seed,
        )
    else:
        source = ImageFolderSource(config.data, max_pixels=config.max_image_pixels)
    return MultiCropDataset(source, geometry, config.seed), len(source)


def build_loader(
    dataset, config: PretrainConfig, plan: BatchPlan, accelerator: Accelerator, start_step: int, end_step: int
) -> DataLoader:
    """This process's DataLoader: micro-batches of ``per_device_batch`` uint8 views from ``start_step`` on."""
    sampler = None
    if isinstance(dataset, MultiCropDataset):
        sampler = StepSampler(
            len(dataset),
            plan,
            rank=accelerator.process_index,
            seed=config.seed,
            start_step=start_step,
            total_steps=end_step,
        )
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=plan.per_device_batch,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.num_workers > 0,
        worker_init_fn=worker_init(config.preemption_signals) if config.num_workers > 0 else None,
    )


def build_model(config: PretrainConfig) -> CLoVEModel:
    return CLoVEModel(
        config.backbone,
        backbone_kwargs=config.backbone_kwargs,
        proj_hidden_dim=config.proj_hidden_dim,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        normalize_qk=config.normalize_qk,
        attn_temperature=config.attn_temperature,
    )


def build_criterion(config: PretrainConfig) -> CLoVELoss:
    return CLoVELoss(
        pos_ratio=config.pos_ratio,
        pos_weight=config.pos_weight,
        margin=config.margin,
        num_negatives=config.num_negatives,
        objective=config.objective,
        negatives=config.negatives,
        queue_size=config.queue_size,
        embed_dim=config.embed_dim,
    )


def _attention_image(attention: torch.Tensor) -> torch.Tensor:
    """(h, L, L) attention of one view -> (h, 1, H, W) map of what the centre location attends to, in [0, 1]."""
    side = math.isqrt(attention.shape[-1])
    centre = attention[:, attention.shape[-1] // 2].reshape(-1, 1, side, side).float()
    return centre / centre.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def save_checkpoint(
    accelerator: Accelerator, config: PretrainConfig, step: int, criterion: CLoVELoss, counters: dict[str, int]
) -> Path:
    """Write a complete checkpoint atomically (see :mod:`training.checkpoint`); all processes take part.

    ``counters`` (skipped steps) go into ``trainer_state.json`` beside the step and the config.
    """
    tmp = ckpt.temporary_dir(config.output_dir, step)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        ckpt.write_json_atomic(tmp / ckpt.TRAINER_STATE, {"step": step, "config": config.to_dict(), **counters})
        extra = {k: v.detach().cpu().contiguous() for k, v in criterion.state_dict().items()}
        if extra:
            save_file(extra, tmp / "criterion.safetensors")
        ckpt.finalize(tmp, config.output_dir, step, config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return ckpt.checkpoint_root(config.output_dir) / ckpt.checkpoint_name(step)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Run pretraining; the student backbone is exported to ``<output_dir>/export`` when the run finishes.

    Raises:
        BadDataError: too many bad files in the image folder.
        NonFiniteLossError: a non-finite value with ``nonfinite_loss=stop``.
        SkippedStepsError: ``max_skipped_steps_in_row`` skipped steps in a row.
        UnsafeCheckpointError: the checkpoint to resume from holds an unsafe pickle.
    """
    recipe, overrides = parse_args(argv)
    config = load_config(recipe, overrides)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Handlers from the start: a signal during start-up still ends in a checkpoint after the first step.
    with StopRequest(config.preemption_signals) as stop_request:
        return _train(config, recipe, stop_request)


def _train(config: PretrainConfig, recipe: str | None, stop_request: StopRequest) -> TrainResult:
    # ---- accelerator and batch plan -------------------------------------------------------------------------
    state = PartialState(cpu=config.cpu)
    plan = plan_batches(config, state.num_processes)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=plan.grad_accum_steps,
        log_with=list(config.trackers) or None,
        project_dir=config.output_dir,
    )
    device = accelerator.device
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (output_dir / "git_revision.txt").write_text(git_revision() + "\n")
    accelerator.wait_for_everyone()
    accelerator.print(
        f"processes={accelerator.num_processes} distributed_type={accelerator.distributed_type} device={device} "
        f"mixed_precision={accelerator.mixed_precision} per_device_batch={plan.per_device_batch} "
        f"grad_accum_steps={plan.grad_accum_steps} global_batch={plan.global_batch}"
    )
    set_seed(config.seed)

    # ---- model, loss, optimizer --------------------------------------------------------------------------------
    model = build_model(config)
    criterion = build_criterion(config).to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed view sizes: let cuDNN pick its fastest kernels once
    if on_cuda and accelerator.num_processes > 1 and config.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if on_cuda and config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    peak_lr = scaled_lr(config.base_lr, plan.global_batch, config.lr_reference_batch)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = LARS(
        param_groups_for_lars(trainable, config.weight_decay),
        lr=peak_lr,
        weight_decay=config.weight_decay,
        momentum=config.sgd_momentum,
        trust_coefficient=config.trust_coefficient,
        eps=config.lars_eps,
    )
    if config.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    photometric = MultiCropPhotometric().to(device)

    # ---- resume --------------------------------------------------------------------------------------------------
    start_step = 0
    counters = {"skipped_steps": 0, "skipped_in_row": 0}
    resume_from = ckpt.resolve_resume(config.resume, config.output_dir, trust=config.trust_checkpoint)
    if resume_from is not None:
        ckpt.check_pickles(resume_from)  # before load_state unpickles anything
        accelerator.load_state(str(resume_from))
        start_step = ckpt.verify(resume_from, check_hashes=False)
        trainer_state = ckpt.read_trainer_state(resume_from)
        counters = {name: int(trainer_state.get(name, 0)) for name in counters}
        extra = resume_from / "criterion.safetensors"
        if extra.is_file():
            criterion.load_state_dict(load_file(extra, device=str(device)))
        accelerator.print(f"resumed from {resume_from} at step {start_step}")

    # ---- data and schedule lengths ----------------------------------------------------------------------------
    dataset, epoch_len = build_source(config, plan, accelerator, start_step)
    total_steps = steps_per_epoch(epoch_len, plan.global_batch) * config.epochs
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch(epoch_len, plan.global_batch)), total_steps - 1)
    end_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
    loader = build_loader(dataset, config, plan, accelerator, start_step, end_step)
    quarantine = None
    if isinstance(dataset, MultiCropDataset) and isinstance(dataset.source, ImageFolderSource):
        quarantine = Quarantine(
            dataset.source,
            output_dir / QUARANTINE_FILE,
            max_fraction=config.max_bad_fraction,
            load_existing=resume_from is not None,
        )
        accelerator.wait_for_everyone()  # every process read the list before the main process rewrites it
        if accelerator.is_main_process:
            quarantine.write()
        quarantine.check()
    accelerator.init_trackers("clove", config={k: str(v) for k, v in config.to_dict().items()})
    unwrapped = accelerator.unwrap_model(model)
    num_global = 2
    # what a skipped step puts back: BatchNorm statistics of student and teacher, the negatives queue
    state_buffers = [*unwrapped.buffers(), *criterion.buffers()]
    trainable_params = [p for _, p in trainable]

    # ---- loop ----------------------------------------------------------------------------------------------------
    model.train()
    step = start_step
    progress = tqdm(total=end_step, initial=start_step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    samples_since_log, log_started = 0, time.perf_counter()
    last_checkpoint = start_step
    preempted = False
    batches = iter(loader)
    while step < end_step:
        # schedules: pure functions of the optimizer step
        lr = learning_rate(
            step,
            base_lr=peak_lr,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            warmup_start_factor=config.warmup_start_factor,
            final_factor=config.final_lr_factor,
        )
        momentum = teacher_momentum(
            step,
            total_steps=total_steps,
            base_momentum=config.base_teacher_momentum,
            final_momentum=config.final_teacher_momentum,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        log_now = (step + 1) % config.log_every == 0 or step + 1 == end_step
        monitor_now = config.monitor_every > 0 and (step + 1) % config.monitor_every == 0
        attention_now = config.attention_every > 0 and (step + 1) % config.attention_every == 0
        saved = [t.detach().clone() for t in state_buffers] if config.nonfinite_loss == "skip" else None
        step_loss = torch.zeros((), device=device)
        step_parts: dict[str, torch.Tensor] = {}
        loss_nonfinite = torch.zeros((), device=device)
        reports = []  # (index, skipped) of every sample of the step, for the quarantine

        for micro in range(plan.grad_accum_steps):
            batch = next(batches)
            reports.append(torch.stack([batch["index"], batch["skipped"]], dim=1))
            # forward + loss
            global_views = batch["global_views"].to(device, non_blocking=True)
            local_views = batch["local_views"].to(device, non_blocking=True)
            global_in, local_in = photometric(
                global_views, local_views, batch["photometric_params"], memory_format=memory_format
            )
            local_in = local_in if local_in.shape[0] else None
            boxes = batch["boxes"].to(device, non_blocking=True).transpose(0, 1)  # (B, V, 4) -> (V, B, 4)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    out = model(global_in, local_in, return_attention=attention_now)
                loss, parts = criterion(
                    out.student_global,
                    out.student_local,
                    out.teacher_global,
                    boxes[:num_global],
                    boxes[num_global:] if local_in is not None else None,
                    return_parts=True,
                )
                loss_nonfinite = torch.maximum(loss_nonfinite, (~torch.isfinite(loss.detach())).float())
                # backward (the gradients of the last micro-batch are all-reduced)
                accelerator.backward(loss)
                step_loss += loss.detach() / plan.grad_accum_steps
                for name, value in parts.items():  # on the device: read only on logging steps
                    step_parts[name] = step_parts.get(name, 0.0) + value / plan.grad_accum_steps
            if criterion.queue is not None:  # which teacher cell each image pushes: fixed by (seed, step, rank)
                generator = derived_generator("queue", config.seed, step, micro, accelerator.process_index)
                criterion.enqueue(
                    accelerator.gather(criterion.queue_candidates(out.teacher_global, num_global, generator))
                )

        # guard: every process agrees on the step's data, numbers and stop requests before the optimizer moves
        reports = torch.cat(reports)
        flags = torch.stack(
            [
                loss_nonfinite,
                # with fp16 the GradScaler owns overflowing gradients (it skips the step and lowers the scale)
                any_nonfinite([p.grad for p in trainable_params] if accelerator.scaler is None else [], device),
                any_nonfinite(state_buffers, device),
                torch.tensor(float(stop_request.requested), device=device),
                reports[:, 1].sum().float().to(device),
            ]
        )
        loss_bad, grads_bad, buffers_bad, stop_votes, skipped_files = accelerator.reduce(flags, "sum").tolist()
        if quarantine is not None and skipped_files > 0:
            indices, skipped = accelerator.gather(reports.to(device)).cpu().T.tolist()
            new = quarantine.add(indices, skipped)
            if new and accelerator.is_main_process:
                quarantine.write()
                _logger.warning("step %d: %d new bad image file(s), listed in %s", step, len(new), quarantine.path)
            quarantine.check(step=step)  # on every process: the same set, the same decision
        skipped_step = False
        if loss_bad or grads_bad or buffers_bad:
            counts = (loss_bad, grads_bad, buffers_bad)
            what, count = next((w, c) for w, c in zip(NONFINITE_WHAT, counts, strict=True) if c)
            if config.nonfinite_loss == "stop":
                raise NonFiniteLossError(
                    f"non-finite {what} at step {step} on {int(count)} process(es); weights and teacher are "
                    f"untouched, the newest checkpoint in {ckpt.checkpoint_root(config.output_dir)} is intact",
                    step=step,
                )
            optimizer.zero_grad(set_to_none=True)
            torch._foreach_copy_(state_buffers, saved)
            skipped_step = True
            accelerator.print(f"step {step}: non-finite {what}, step skipped")
        else:
            # optimizer step (a GradScaler skips it on overflowing fp16 gradients) and teacher EMA
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            skipped_step = accelerator.optimizer_step_was_skipped
            if not skipped_step:
                unwrapped.update_teacher(momentum)
        counters["skipped_steps"] += int(skipped_step)
        counters["skipped_in_row"] = counters["skipped_in_row"] + 1 if skipped_step else 0
        if counters["skipped_in_row"] >= config.max_skipped_steps_in_row:
            scale = f" (loss scale now {accelerator.scaler.get_scale():g})" if accelerator.scaler is not None else ""
            raise SkippedStepsError(
                f"{counters['skipped_in_row']} optimizer steps in a row were skipped up to step {step}{scale}, "
                f"max_skipped_steps_in_row={config.max_skipped_steps_in_row}: the run no longer trains; the "
                f"newest checkpoint in {ckpt.checkpoint_root(config.output_dir)} is intact"
            )
        step += 1
        samples_since_log += plan.global_batch
        progress.update(1)

        # logging
        if log_now:
            mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
            names = sorted(step_parts)
            part_values = accelerator.reduce(torch.stack([step_parts[n] for n in names]), reduction="mean").tolist()
            elapsed = time.perf_counter() - log_started
            throughput = samples_since_log / max(elapsed, 1e-9)
            samples_since_log, log_started = 0, time.perf_counter()
            metrics = {
                "loss": mean_loss,
                "lr": lr,
                "teacher_momentum": momentum,
                "samples_per_s": throughput,
                "skipped_steps": counters["skipped_steps"],
                **{f"loss_parts/{n}": v for n, v in zip(names, part_values, strict=True)},
            }
            accelerator.log(metrics, step=step)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", samples_s=f"{throughput:.1f}")
        if monitor_now:
            stats = collapse_stats(accelerator.gather(out.teacher_global.detach()))
            accelerator.log({f"collapse/{k}": v for k, v in stats.items()}, step=step)
            if stats["collapsed"]:
                accelerator.print(f"step {step}: teacher features look collapsed: {stats}")
        if attention_now and accelerator.is_main_process:
            for tracker in accelerator.trackers:
                if hasattr(tracker, "log_images"):
                    tracker.log_images({"attention/global": _attention_image(out.attention["global"][0])}, step=step)

        # checkpoint
        if step % config.checkpoint_every == 0 or step == end_step:
            save_checkpoint(accelerator, config, step, criterion, counters)
            last_checkpoint = step
        # preemption: every process saw the same vote, so all stop after this step
        if stop_votes and step < end_step:
            if last_checkpoint != step:
                save_checkpoint(accelerator, config, step, criterion, counters)
                last_checkpoint = step
            preempted = True
            accelerator.print(
                f"preemption signal on {int(stop_votes)} process(es): stopped after step {step} with a complete "
                f"checkpoint; relaunch with resume=auto to continue"
            )
            break
    progress.close()
    if last_checkpoint != step:
        save_checkpoint(accelerator, config, step, criterion, counters)
    # ---- export the student backbone (a preempted run exports when it finishes) -------------------------------
    export_dir = output_dir / "export"
    final = ckpt.checkpoint_root(config.output_dir) / ckpt.checkpoint_name(step)
    if accelerator.is_main_process and not preempted:
        from clove_timm.export import export_timm_folder

        export_timm_folder(
            final,
            export_dir,
            branch="student",
            name=config.export_name,
            epochs=config.epochs,
            dataset="imagenet-1k" if config.data != "procedural" else "procedural (built-in)",
            recipe=recipe,
            overwrite=True,  # the run owns its export folder; a resumed run re-exports its newer weights
        )
        accelerator.print(f"exported the student backbone to {export_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        export_dir,
        step,
        unwrapped,
        optimizer,
        accelerator.num_processes,
        preempted=preempted,
        skipped_steps=counters["skipped_steps"],
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(PREEMPTED_EXIT_CODE if main().preempted else 0)
