"""The training loop: `train(config)` runs one `TrainConfig` end to end.

1. `train` claims the run directory before anything is written (`softprompt.training.run_directory`): it locks it
   for the run's duration, refuses it if it holds another run, and picks the checkpoint a ``--resume`` continues
   from, its settings checked against the run's.
2. `setup` seeds everything, loads the frozen base (a hub id or local directory, or the embedded tiny BLOOM),
   prepares the data (`softprompt.training.method_data`), builds one adapter per task, the optimizer (AdamW over the
   adapters only), the linear warmup + decay schedule and, for fp16, a grad scaler, and restores the checkpoint: a
   `RunState`. Only then, every input checked, does it write: the settings and the embedded base.
3. `run_loop` evaluates before training, then for every epoch walks the seeded order of the training rows in
   micro-batches, takes optimizer steps (`softprompt.training.optimizer_step`), logs every step, evaluates and
   checkpoints at every epoch end and every ``save_every`` steps (`softprompt.training.checkpoint`, resumable bit
   for bit on CPU), and `finish` saves the adapters, the plot and a few generations.

Several processes (``torchrun``): every process holds the frozen base and the adapters and takes its share of each
micro-batch; the step sums gradients over processes. Only rank 0 evaluates and writes files (with ``--fsdp`` the base
is sharded over them, `softprompt.training.fsdp`, and every process evaluates). Nothing here prints: progress goes to
tqdm bars and to the ``on_event`` callback, which the CLI prints.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from softprompt.data import collate
from softprompt.inputs import check_loss_implementation
from softprompt.model import SoftPromptModel
from softprompt.multi_task import make_trainable
from softprompt.pretrained import read_adapter, save_one
from softprompt.quickstart import save_tiny_bloom
from softprompt.training.base_model import (
    CONFIG_FILE,
    cpu_threads,
    default_threads,
    load_base_model,
    resolve_device,
    with_model_sha256,
)
from softprompt.training.checkpoint import (
    Checkpoint,
    complete_checkpoint_directories,
    restore_training_state,
    save_checkpoint,
)
from softprompt.training.config import ConfigError, TrainConfig
from softprompt.training.evaluation import (
    evaluate,
    resolve_autocast,
    sample_generations,
    to_device,
)
from softprompt.training.examples import epoch_order
from softprompt.training.fsdp import as_model_call, process_mesh, shard_frozen_base
from softprompt.training.method_data import prepare_run_data
from softprompt.training.metrics import MetricsLog, plot_metrics, read_metrics
from softprompt.training.optimizer_step import (
    STAND_IN,
    NonFiniteStep,
    linear_schedule,
    optimizer_step,
)
from softprompt.training.run_directory import (
    METRICS_FILE,
    PLOT_FILE,
    RunClaim,
    claim_run_directory,
    embedded_base_directory,
    final_adapter_directories,
    write_run_config,
)
from softprompt.training.run_state import (
    Event,
    RunState,
    TrainingDivergedError,
    TrainingInterrupted,
    TrainResult,
)
from softprompt.training_loss import layout_for


def train(
    config: TrainConfig,
    on_event: Callable[[Event], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Runs one training run end to end (see the module docstring).

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or set at all with ``--fsdp``) it joins the process group (gloo on CPU,
    NCCL on CUDA) unless one is already initialized, and leaves it at the end if it joined it.

    Args:
        config: the run's settings.
        on_event: called with progress events (dicts with an ``"event"`` key); rank 0 only.
        stop_requested: asked before every optimizer step; True stops the run there as Ctrl-C does
            (`TrainingInterrupted`). With several processes the answer is shared, so that all stop at the same step.
            The command line answers True after a first Ctrl-C: a KeyboardInterrupt raised inside a finalizer is
            swallowed by Python, a request that waits for the next step is not.

    Returns:
        The `TrainResult` (on every rank; only rank 0's paths hold files).

    Nothing is written before every setting, the run directory (locked for the run's duration), the checkpoint
    to resume from, the base model and the data have been checked: a refused or failed run leaves the directory as
    it found it.

    Raises:
        ConfigError: the output directory holds another run (without --resume / --overwrite), is in use by another
            process, has no usable checkpoint to resume where starting over would lose progress, or its checkpoint
            was made with other settings or other data.
        DataError: the data cannot be used.
        TrainingDivergedError: the loss became NaN or infinite (the last checkpoint is left as it was).
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt saying how to resume).
        ValueError: the base model cannot be loaded, or the loss implementation cannot run on the device.
    """
    joined = False
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is not None and (int(world_size) > 1 or config.execution.fsdp) and not dist.is_initialized():
        backend = "nccl" if config.execution.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        joined = True
    run = None
    try:
        started = time.perf_counter()
        device = resolve_device(config.execution.device)
        check_loss_implementation(config.execution.loss_implementation, device)
        config = with_model_sha256(config)  # a .gguf base's bytes, recorded (and compared by --resume)
        with claim_run_directory(config, main_process_emitter(on_event)) as claim:
            base, tokenizer = load_run_base(config)
            threads = config.execution.num_threads
            threads = threads if threads is not None else default_threads(base)
            with cpu_threads(threads if device.type == "cpu" else config.execution.num_threads):
                run = setup(config, base, tokenizer, device, claim, on_event)
                run.stop_requested = stop_requested
                return run_loop(run, started)
    except KeyboardInterrupt:
        raise interrupted(config, run) from None
    finally:
        if joined:
            dist.destroy_process_group()


def main_process_emitter(on_event: Callable[[Event], None] | None) -> Callable[..., None]:
    """``emit(event, **values)`` calling ``on_event`` on rank 0 (nothing elsewhere)."""
    def emit(event: str, **values: Any) -> None:
        if on_event is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            on_event({"event": event, **values})
    return emit


def load_run_base(config: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """Seeds every generator and loads the base; returns (base, tokenizer)."""
    torch.manual_seed(config.optimization.seed)
    random.seed(config.optimization.seed)
    np.random.seed(config.optimization.seed)
    return load_base_model(config.model, getattr(torch, config.execution.base_dtype))


def setup(
    config: TrainConfig, base: torch.nn.Module, tokenizer: Any, device: torch.device, claim: RunClaim,
    on_event: Callable[[Event], None] | None = None,
) -> RunState:
    """The run's state: data prepared, one adapter per task, optimizer, schedule, grad scaler, the checkpoint
    restored; then, every check passed, the run's first writes (the settings and the embedded base)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    output_dir = config.resolved_output_dir
    base_directory = embedded_base_directory(output_dir) if config.uses_embedded_model else None
    if base_directory is not None:
        base.config._name_or_path = str(base_directory)  # recorded by every adapter saved from this base
    sharded = config.execution.fsdp and dist.is_initialized()
    if not sharded:  # sharded, the base reaches the device layer by layer as it is sharded, never whole
        base.to(device)
    # Each adapter's config: the method's needs of the data. A recipe may run the base here (a teacher's targets).
    data, adapters = prepare_run_data(config, tokenizer, base_model=base)
    names = data.adapter_names
    model = SoftPromptModel(base, adapters[names[0]], tokenizer=tokenizer, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, adapters[name], tokenizer=tokenizer)
    data.initialize(model)  # the recipe's own init (a cartridge from the corpus), under any checkpoint restored
    model.prompts.to(device)  # built beside the base (on the CPU when sharded: an init may run the base)
    make_trainable(model, names)
    if config.execution.compile is not None:
        model.compile_decoder(mode=config.execution.compile)
    trainable = {name: [p for p in model.prompts[name].parameters() if p.requires_grad] for name in names}
    if world_size > 1:  # every process starts from rank 0's adapters (they are seeded alike; this makes it certain)
        for group in trainable.values():
            for parameter in group:
                dist.broadcast(parameter.data, src=0)

    optimization = config.optimization
    micro_batches = math.ceil(len(data.train) / (optimization.batch_size * world_size))
    steps_per_epoch = math.ceil(micro_batches / optimization.gradient_accumulation_steps)
    total_steps = steps_per_epoch * optimization.num_epochs
    optimizer = torch.optim.AdamW([p for group in trainable.values() for p in group],
                                  lr=optimization.learning_rate, weight_decay=optimization.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(optimization.warmup_steps, total_steps))
    autocast_dtype = resolve_autocast(config.execution.mixed_precision, device)
    run = RunState(
        config=config, output_dir=output_dir, rank=rank, world_size=world_size, device=device,
        autocast_dtype=autocast_dtype, tokenizer=tokenizer, base_name=base.config._name_or_path, data=data,
        model=model, trainable=trainable, optimizer=optimizer, scheduler=scheduler, sharded=sharded,
        scaler=torch.amp.GradScaler("cuda") if autocast_dtype is torch.float16 else None,
        metrics=MetricsLog(output_dir / METRICS_FILE, enabled=rank == 0),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, on_event=on_event,
    )
    if claim.checkpoint is not None:
        restore(run, claim.checkpoint)
    if rank == 0:
        claim.begin_writing(run.emit)
        if base_directory is not None:
            save_tiny_bloom(base_directory, tokenizer=tokenizer, model=base)
        write_run_config(output_dir, config)
        data.write(output_dir)
    if sharded:  # after the writes: the embedded base is saved whole
        shard_frozen_base(model, process_mesh(device), param_dtype=autocast_dtype)
        # The recipe's loss (the steps' and the evaluation's) as one call of the sharded model: context
        # distillation's runs the frozen passes itself, which would find the embeddings and head sharded.
        data.loss = as_model_call(data.loss)
    trainable_count, total_count = model.num_parameters()
    layout = config.execution.virtual_token_layout
    if layout == "auto":  # what it chooses for a full micro-batch (rows of one adapter)
        full = model.row_layout(optimization.batch_size, [names[0]] * optimization.batch_size)
        layout = f"auto: {layout_for(model.frozen, full, device)} for {optimization.batch_size} rows"
    run.emit("start", output_dir=str(output_dir), base_model=run.base_name, device=str(device),
             processes=world_size, fsdp=sharded, method=config.method, adapters=names, recipe=data.kind,
             train_examples=len(data.train), eval_examples=len(data.eval), steps=total_steps,
             trainable_parameters=trainable_count, total_parameters=total_count, virtual_token_layout=layout)
    return run


def run_loop(run: RunState, started: float) -> TrainResult:
    """The loop itself, from the first batch to the final adapters (see the module docstring)."""
    config, data, model = run.config, run.data, run.model
    optimization = config.optimization
    checkpoint, start_epoch, start_step = run.checkpoint, run.start_epoch, run.start_step
    if checkpoint is not None:
        recorded = int(checkpoint.state["metrics_bytes"])
        found = run.metrics.resume_at(recorded)  # drops what was logged after the checkpoint
        if found < recorded:
            run.emit("metrics_incomplete", path=str(run.metrics.path), found=found, recorded=recorded,
                     step=run.global_step)
        run.emit("resumed", checkpoint=str(checkpoint.directory), step=run.global_step, epoch=start_epoch)
    else:
        run.metrics.start()
        evaluate_and_log(run, epoch=0, step=0)

    bar = tqdm(total=run.total_steps, initial=run.global_step, desc=f"train {config.method}", unit="step",
               disable=not (config.output.progress and run.is_main), dynamic_ncols=True)
    rows_per_micro_batch = optimization.batch_size * run.world_size
    accumulation = optimization.gradient_accumulation_steps
    loss_options = {"implementation": config.execution.loss_implementation,
                    "virtual_token_layout": config.execution.virtual_token_layout}
    model.train()
    for epoch in range(start_epoch, optimization.num_epochs):
        order = epoch_order(len(data.train), optimization.seed, epoch)
        # Global micro-batches; process r takes rows [r * batch_size, (r + 1) * batch_size) of each.
        micro_batches = [order[i : i + rows_per_micro_batch] for i in range(0, len(order), rows_per_micro_batch)]
        for step_in_epoch in range(start_step if epoch == start_epoch else 0, run.steps_per_epoch):
            if run.should_stop():
                raise KeyboardInterrupt  # reported by train() as TrainingInterrupted, with how to resume
            step_started = time.perf_counter()
            group = micro_batches[step_in_epoch * accumulation : (step_in_epoch + 1) * accumulation]
            batches = [own_batch(run, rows) for rows in group]
            try:
                step = optimizer_step(model, run.trainable, run.optimizer, run.scheduler,
                                      [batch for batch in batches if batch is not None], loss_options,
                                      optimization.max_grad_norm, run.autocast, run.scaler, run.world_size, data.loss,
                                      sharded=run.sharded)
            except NonFiniteStep as error:
                raise diverged(run, error, run.global_step + 1, epoch) from None
            run.global_step += 1
            global_step = run.global_step
            seconds = time.perf_counter() - step_started  # the batches' collation and the optimizer step
            throughput = step.tokens / seconds
            learning_rate = run.scheduler.get_last_lr()[0]
            record = {"event": "train", "epoch": epoch + (step_in_epoch + 1) / run.steps_per_epoch,
                      "step": global_step, "loss": step.loss, "lr": learning_rate, "grad_norm": step.grad_norm,
                      "tokens_per_second": throughput, "seconds": seconds}
            if step.skipped_micro_batches:  # micro-batches without a labelled position: counted, never a NaN
                record["skipped_micro_batches"] = step.skipped_micro_batches
            run.metrics.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step.loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{throughput:,.0f}")
            if step_in_epoch + 1 == run.steps_per_epoch:
                evaluate_and_log(run, epoch=epoch + 1, step=global_step)
                model.train()
                # The position is the start of the next epoch, so it carries that epoch's order: the one a
                # resumed run checks against.
                next_order = epoch_order(len(data.train), optimization.seed, epoch + 1)
                save(run, global_step, {"epoch": epoch + 1, "step_in_epoch": 0, "order": next_order})
            elif config.output.save_every and global_step % config.output.save_every == 0:
                save(run, global_step, {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "order": order})
    bar.close()
    return finish(run, started)


def own_batch(run: RunState, global_rows: list[int]) -> dict[str, Any] | None:
    """This process's share of a global micro-batch, collated on the run's device (None when it has no rows: the
    epoch's last micro-batch can leave a process without any; with the base sharded, a stand-in instead, the
    micro-batch's first row marked `STAND_IN`: the others' passes gather weights from this process too, so it must
    make the same ones)."""
    batch_size = run.config.optimization.batch_size
    rows = global_rows[run.rank * batch_size : (run.rank + 1) * batch_size]
    stand_in = not rows and run.sharded
    if stand_in:
        rows = global_rows[:1]
    if not rows:
        return None
    data = run.config.data
    batch = collate([run.data.train[i] for i in rows], pad_token_id=run.tokenizer.pad_token_id,
                    padding=data.padding, max_length=data.max_length)
    if stand_in:
        batch[STAND_IN] = True
    return to_device(batch, run.device)


def evaluate_and_log(run: RunState, epoch: int, step: int) -> dict[str, Any] | None:
    """Evaluates on the held-out rows, if any (rank 0; every process when the base is sharded); rank 0 logs it."""
    result = None
    if (run.is_main or run.sharded) and run.data.eval:
        result = evaluate(run.model, run.tokenizer, run.data, run.config.optimization.eval_batch_size,
                          run.config.data.padding, run.config.data.max_length, run.autocast_dtype)
    if run.is_main and result is not None:
        record = {"event": "eval", "epoch": epoch, "step": step,
                  **{key: value for key, value in result.items() if key != "examples"}}
        run.metrics.append(record)
        run.emit("eval", **{key: value for key, value in record.items() if key != "event"})
    run.barrier()
    return result


def save(run: RunState, step: int, position: dict[str, Any]) -> None:
    """Writes a checkpoint (rank 0): the adapters, optimizer, schedule, scaler, random states, data position."""
    if run.is_main:
        directory = save_checkpoint(
            run.output_dir, step,
            save_adapters=lambda target: [save_one(run.model, target / name, name, "softprompt")
                                           for name in run.trainable],
            optimizer=run.optimizer, scheduler=run.scheduler, scaler=run.scaler,
            position={**position, "global_step": step},
            extra={"metrics_bytes": run.metrics.size, "config": run.config.to_dict()},
            keep_last=run.config.output.keep_last,
        )
        run.emit("checkpoint", path=str(directory), step=step)
    run.barrier()


def restore(run: RunState, checkpoint: Checkpoint) -> None:
    """Loads a checkpoint into the run and sets where the loop starts.

    Raises:
        ConfigError: the checkpoint's data position does not fit this run's data (the data changed since).
    """
    position = checkpoint.state["position"]
    epoch = int(position["epoch"])
    if epoch < run.config.optimization.num_epochs and position["order"] != epoch_order(
            len(run.data.train), run.config.optimization.seed, epoch):
        raise ConfigError(
            f"{checkpoint.directory}: the training data's order differs from the checkpoint's: the data changed "
            "since it was written. Fix: resume with the same data, or start over with --overwrite."
        )
    for name in run.trainable:
        _, module = read_adapter(checkpoint.adapter_directory(name), run.model.base_model, "softprompt")
        run.model.prompts[name].load_state_dict(module.state_dict())
    restore_training_state(checkpoint, run.optimizer, run.scheduler, run.scaler)
    run.checkpoint, run.start_epoch, run.start_step = checkpoint, epoch, int(position["step_in_epoch"])
    run.global_step = checkpoint.step


def diverged(run: RunState, error: NonFiniteStep, step: int, epoch: int) -> TrainingDivergedError:
    """The error for a non-finite step, naming the last good checkpoint and the fixes."""
    checkpoints = complete_checkpoint_directories(run.output_dir)
    last = f"The last good checkpoint, {checkpoints[-1]}, is untouched" if checkpoints else "No checkpoint exists"
    return TrainingDivergedError(
        f"The {error.what} became {error.value} at step {step} (epoch {epoch + 1}, learning rate "
        f"{run.scheduler.get_last_lr()[0]:.3g}): training stopped before updating the adapters. {last}. "
        "Fix: lower --learning-rate, keep --max-grad-norm on (e.g. 1.0), or use --mixed-precision no (or "
        "bf16) instead of fp16; then start over with --overwrite."
    )


def interrupted(config: TrainConfig, run: RunState | None) -> TrainingInterrupted:
    """The error for Ctrl-C: where the run stopped and how to continue it."""
    output_dir = config.resolved_output_dir
    resume = f"softprompt train --config {output_dir / CONFIG_FILE} --resume"
    if run is None or not (output_dir / CONFIG_FILE).is_file():
        return TrainingInterrupted(f"Interrupted before training began; nothing was written to {output_dir}. Fix: run "
                                   "the same command again.")
    checkpoints = complete_checkpoint_directories(output_dir)
    if checkpoints:
        where = (f"The newest checkpoint, {checkpoints[-1]}, is complete: continue from it with `{resume}` (the same "
                 "settings).")
    else:
        where = f"No checkpoint was written yet: `{resume}` starts the run again from the beginning."
    return TrainingInterrupted(f"Interrupted at step {run.global_step} of {run.total_steps}. {where}")


def finish(run: RunState, started: float) -> TrainResult:
    """Final adapters, plot, a few generations, the result."""
    config = run.config
    run.model.eval()
    adapter_directories = final_adapter_directories(run.output_dir, list(run.trainable))
    initial_eval = final_eval = plot_path = None
    generations: list[dict[str, Any]] = []
    if run.is_main:
        for name, directory in adapter_directories.items():
            save_one(run.model, directory, name, "softprompt")
        # Read back, so that a resumed run reports the evaluations of its earlier part too; by their step, so that
        # a log that lost its start (deleted before a resume) reports none rather than a later one as the first.
        evaluations = [r for r in read_metrics(run.output_dir / METRICS_FILE) if r.get("event") == "eval"]
        initial_eval = next((r for r in evaluations if r.get("step") == 0), None)
        final_eval = next((r for r in reversed(evaluations) if r.get("step") == run.global_step), None)
        base = "the embedded tiny BLOOM" if config.uses_embedded_model else run.base_name
        plot_path = plot_metrics(run.output_dir / METRICS_FILE, run.output_dir / PLOT_FILE, f"{config.method} on {base}")
    if run.is_main or run.sharded:
        generations = sample_generations(run.model, run.tokenizer, run.data, config.output.num_generations)
    run.barrier()
    result = TrainResult(
        output_dir=run.output_dir, adapter_directories=adapter_directories,
        metrics_path=run.output_dir / METRICS_FILE, plot_path=plot_path, base_model=run.base_name,
        initial_eval=initial_eval, final_eval=final_eval, generations=generations,
        global_step=run.global_step, elapsed_seconds=time.perf_counter() - started,
        resumed_from=run.checkpoint.directory if run.checkpoint is not None else None,
    )
    run.emit("done", result=result)
    return result
