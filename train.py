"""Train a model with fault-tolerant checkpointing: `python train.py model=mlp [key=value ...]`.

Rerunning the same command resumes from the newest intact checkpoint in `checkpoint.dir`.
Exit codes: 0 done, 2 bad config/data/checkpoint (message printed), `preemption.exit_code`
(default 42) stopped by a signal after saving, 1 crash (traceback printed).
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from harness.config import register_configs


def train(cfg: DictConfig):
    """The whole run for a composed config; returns the controller's `Outcome`."""
    from harness import checkpointing, config, controller, data, data_sources, loop, modeling, optimization
    from harness import preemption, progress, run_dir, runtime, state, strategy, summaries

    run = config.to_typed_config(cfg)
    dist = strategy.build_strategy(run.strategy)
    is_chief = strategy.is_chief(dist)
    runtime.configure_runtime(seed=run.seed, deterministic=run.deterministic,
                              mixed_precision=run.trainer.mixed_precision)
    examples = data_sources.load_examples(run.data)
    pipeline = data.SeekableInput(
        examples, global_batch_size=run.data.global_batch_size,
        eval_batch_size=run.data.eval_batch_size or run.data.global_batch_size,
        shuffle_seed=run.seed if run.data.shuffle_seed is None else run.data.shuffle_seed,
        prefetch=run.data.prefetch, num_replicas=dist.num_replicas_in_sync)
    with dist.scope():
        model = modeling.build_model(run.model, input_shape=examples.input_shape,
                                     num_classes=examples.num_classes, seed=run.seed)
        optimizer = optimization.build_optimizer(run.optimizer, max_steps=run.trainer.max_steps)
        train_state = state.create_train_state(model, optimizer)
    checkpointer = checkpointing.Checkpointer(
        train_state, directory=run.checkpoint.dir, max_to_keep=run.checkpoint.max_to_keep,
        keep_every_hours=run.checkpoint.keep_every_hours, async_save=run.checkpoint_async, is_chief=is_chief)
    restored = checkpointer.restore_latest()
    start_step = restored.step or 0
    if is_chief:
        run_dir.write_config_record(run.run_dir, run.resolved)
    train_metrics, eval_metrics = loop.Accumulators(dist), loop.Accumulators(dist)
    with preemption.PreemptionWatcher(run.preemption.signals, exit_code=run.preemption.exit_code) as watcher, \
            summaries.Summaries(run_dir.tensorboard_dir(run.run_dir), enabled=is_chief, start_step=start_step) as tb:
        if restored.step is None:
            tb.hparams(run.resolved)
        return controller.Controller(
            strategy=dist, state=train_state, pipeline=pipeline,
            train_loop=loop.make_train_loop(dist, train_state, train_metrics, global_batch_size=pipeline.global_batch_size,
                                            seed=run.seed, jit_compile=run.trainer.jit_compile),
            eval_loop=loop.make_eval_loop(dist, train_state, eval_metrics, eval_batch_size=pipeline.eval_batch_size),
            train_metrics=train_metrics, eval_metrics=eval_metrics, checkpointer=checkpointer,
            checkpoint_every=run.checkpoint.every_steps, summaries=tb,
            progress=progress.Progress(run.trainer.progress, start_step=start_step, max_steps=run.trainer.max_steps,
                                       enabled=is_chief),
            watcher=watcher, trainer=run.trainer,
        ).run()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from harness.errors import exit_code_of

    raise SystemExit(exit_code_of(train, cfg))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    register_configs()
    main()
