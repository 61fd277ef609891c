"""Train a model with fault-tolerant checkpointing: `python train.py model=mlp [key=value ...]`.

Rerunning the same command resumes from the newest intact checkpoint in `checkpoint.dir`.
Exit codes (the README has the table): 0 done, 1 crash, 2 bad config/data/checkpoint, 3 diverged,
4 hung or lost a peer, 5 checkpoint storage failing, 6 another run holds checkpoint.dir, 7 crash
loop refused, `preemption.exit_code` (default 42) stopped by a signal after saving.
"""

from __future__ import annotations

import logging
import os
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.config.composition import register_configs

PROCESS_STARTED = time.time()
_main_entered = False  # Hydra composed the config: from here on, Hydra's own exit 1 means a crash


def train(cfg: DictConfig):
    """The whole run for a composed config; returns the controller's `Outcome`."""
    from harness.config.run_config import to_typed_config

    run = to_typed_config(cfg)  # config errors surface before TensorFlow is imported
    from harness.lean_import import import_tensorflow

    import_tensorflow()  # without Keras's optional scikit-learn and IPython imports: ~1 s of every start
    from harness import runtime
    from harness.checkpoint import checkpointer, pacing
    from harness.control import actions, controller, progress, summaries
    from harness.data import pipeline
    from harness.distributed import strategy
    from harness.operations import attempt, preemption, run_dir, watchdog
    from harness.results import export, warm_start
    from harness.training import assembly, loop

    runtime.configure_threads(intra_op=run.trainer.intra_op_threads, inter_op=run.trainer.inter_op_threads)
    dist = strategy.build_strategy(run.strategy)  # first TF work: fixes the devices
    is_chief = strategy.is_chief(dist)
    runtime.configure_runtime(seed=run.seed, deterministic=run.deterministic,
                              mixed_precision=run.trainer.mixed_precision)
    task_data = assembly.load_task_data(run)  # the task checks the targets
    task, examples = task_data.task, task_data.examples
    inputs = pipeline.build_input(examples, run.data, seed=run.seed, num_replicas=dist.num_replicas_in_sync)
    runtime.advise_a_core_for_the_input(file_backed=inputs.from_files)

    if run.export.enabled and is_chief:
        export.check_export_dir(run.export.dir)  # not hours of training first
    # Variables' initial values are broadcast from worker 0: a peer lost there stops the run like one lost in
    # training (exit 4, the gang restarts), not as a crash.
    with dist.scope(), strategy.lost_peers_stall(dist, when=lambda: "during start-up, while building the model"):
        train_state = assembly.build_train_state(run, task_data)  # refuses a model that does not fit the task
    model = train_state.model

    # Lease on checkpoint.dir and crash-loop check first: a refused start writes nothing.
    with attempt.Attempt(run, is_chief=is_chief, process_started=PROCESS_STARTED) as this_attempt:
        checkpoints = checkpointer.Checkpointer.from_config(
            train_state, run.checkpoint, async_save=run.checkpoint_async, is_chief=is_chief,
            provenance=this_attempt.provenance_text, before_write=this_attempt.before_write)
        start_step = checkpoints.restore_latest(verify=this_attempt.verify_resume).step  # refuses before any write
        strategy.check_workers_restored_the_same_step(dist, start_step, checkpoint_dir=run.checkpoint.dir)
        warm_start.warm_start_fresh_run(model, init_from=run.init_from, skip=run.init_from_skip,
                                        name_map=run.init_from_name_map, resumed_step=start_step)
        if is_chief:
            run_dir.write_config_record(run.run_dir, run.resolved)
            run_dir.write_model_signature(run.run_dir, input_shape=examples.input_shape,
                                          input_dtype=examples.input_dtype, task=task)
        this_attempt.begin(start_step or 0)

        train_loop, eval_loop = loop.build_loops(dist, task, train_state, inputs, seed=run.seed,
                                                 jit_compile=run.trainer.jit_compile,
                                                 steps_per_loop=run.trainer.steps_per_loop)
        with preemption.PreemptionWatcher(run.preemption.signals, exit_code=run.preemption.exit_code) as watcher, \
                summaries.Summaries(run_dir.tensorboard_dir(run.run_dir), enabled=is_chief,
                                    start_step=start_step or 0) as tensorboard, \
                watchdog.Watchdog(run.watchdog, on_hang=this_attempt.record_hang,
                                  patience_seconds=checkpoints.longest_backoff_seconds) as hang_watchdog:
            if start_step is None:
                tensorboard.hparams(run.resolved)
            tensorboard.scalars(tensorboard.start_marker_step, this_attempt.accounting.record.scalars())
            display = progress.Progress(run.trainer.progress, start_step=start_step or 0,
                                        max_steps=run.trainer.max_steps, enabled=is_chief)
            boundary_actions = actions.standard_actions(
                strategy=dist, task=task, state=train_state, pipeline=inputs, train_metrics=train_loop.metrics,
                eval_loop=eval_loop, checkpointer=checkpoints,
                pacer=pacing.SavePacer.from_config(run.checkpoint, start_step=start_step or 0),
                summaries=tensorboard, progress=display, trainer=run.trainer, watchdog=hang_watchdog,
                attempt=this_attempt, stop_exit_code=run.preemption.exit_code)
            with actions.saves_landed_on_error(checkpoints, hang_watchdog):
                outcome = controller.Controller(
                    strategy=dist, state=train_state, pipeline=inputs, train_loop=train_loop,
                    actions=boundary_actions, max_steps=run.trainer.max_steps,
                    steps_per_loop=run.trainer.steps_per_loop, watcher=watcher, attempt=this_attempt,
                    watchdog=hang_watchdog, progress=display,
                ).run()
        this_attempt.finish(outcome.status.value, step=outcome.step)
    export.export_finished_run(model, run.export, task=task, input_shape=examples.input_shape,
                               input_dtype=examples.input_dtype,
                               status=outcome.status, is_chief=is_chief)
    return outcome


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _main_entered
    _main_entered = True
    logging.raiseExceptions = False  # a full disk under train.log must not print a traceback per log line
    from harness.errors import exit_code_of
    from harness.operations.process_exit import exit_process, ignore_signals_while_exiting

    exit_code = exit_code_of(train, cfg)
    if exit_code == 0 and HydraConfig.get().mode == RunMode.MULTIRUN:
        from harness.operations.preemption import carry_stop_signals_to_the_next_job

        carry_stop_signals_to_the_next_job(list(cfg.preemption.signals))
        return  # let Hydra run the sweep's next job; a non-zero code stops the sweep, as a crash would
    ignore_signals_while_exiting(list(cfg.preemption.signals))  # a late SIGTERM must not change the exit code
    exit_process(exit_code)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    register_configs()
    try:
        main()
    except SystemExit as exiting:
        # Hydra exits 1 when it cannot compose the config (a misspelt key, a wrong type), before
        # main() runs: that is a config error, exit 2 as the exit-code table says.
        if exiting.code == 1 and not _main_entered:
            raise SystemExit(2) from None
        raise
