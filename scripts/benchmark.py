"""Benchmark train.py against a hand-written loop and `model.fit`; checkpoint stall, restore, start-up.

    python scripts/benchmark.py                                  # all sections, 5 repeats
    python scripts/benchmark.py --sections throughput --repeats 3 --variants

Prints markdown tables of medians and ratios; docs/benchmarks.md records a run and the machine.
The timing method (interleaving, start-up cancelled by (t(N2) - t(N1)) / (N2 - N1)) is described
in scripts/tooling/benchmarking.py. Run it on a quiet machine when you can; it reports the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.tooling import benchmarking as bench

SECTIONS = ("throughput", "stall", "restore", "startup", "checkpoint", "data")
# train.py as a user would run it for speed: 100 steps per tf.function call, a log line and a
# TensorBoard point every 100 steps, a checkpoint every 1000; eval and export only at the end
# (they cancel out of t(N2) - t(N1)).
HARNESS_SETTINGS = ["trainer.steps_per_loop=100", "trainer.log_every=100", "trainer.eval_every=0",
                    "checkpoint.every_steps=1000", "trainer.progress=log", "export.enabled=false"]
VARIANTS = {  # --variants: the speed options, same workload and settings
    "train.py data.prefetch=2 (tf.data)": ["data.prefetch=2"],
    "train.py checkpoint.async=true": ["checkpoint.async=true"],
    "train.py trainer.jit_compile=true": ["trainer.jit_compile=true"],
    "train.py trainer.mixed_precision=mixed_bfloat16": ["trainer.mixed_precision=mixed_bfloat16"],
}
BASELINE = "hand-written tf.function loop, 100 steps/call"


def machine_line() -> str:
    import tensorflow as tf

    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    return (f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"load average at start {os.getloadavg()[0]:.2f}")


def throughput(args: argparse.Namespace, work_dir: str) -> None:
    from train import train

    workload = bench.Workload()
    harness = [*workload.overrides(), *HARNESS_SETTINGS]
    steps_per_epoch = bench.keras_steps_per_epoch(workload)
    contenders = [
        bench.Contender("train.py (train.py settings above)", bench.harness_runner(train, harness, work_dir=work_dir),
                        args.short_steps, args.long_steps),
        bench.Contender(BASELINE, bench.hand_written_runner(workload, steps_per_call=100),
                        args.short_steps, args.long_steps),
        bench.Contender("hand-written loop, 100 steps/call, fixed order (no shuffle: lower bound)",
                        bench.hand_written_runner(workload, steps_per_call=100, shuffle=False),
                        args.short_steps, args.long_steps),
        bench.Contender("hand-written tf.function loop, 1 step/call",
                        bench.hand_written_runner(workload, steps_per_call=1), args.short_steps // 2,
                        args.long_steps // 2),
        bench.Contender("keras model.fit defaults", bench.keras_fit_runner(workload),
                        5 * steps_per_epoch, 20 * steps_per_epoch),
    ]
    if args.variants:
        contenders += [bench.Contender(name, bench.harness_runner(train, [*harness, *extra], work_dir=work_dir),
                                       args.short_steps, args.long_steps) for name, extra in VARIANTS.items()]
    if args.core:  # more repeats in the same time for the one ratio the target is about
        contenders = [c for c in contenders if c.name in ("train.py (train.py settings above)", BASELINE)]
    print(f"\n## Throughput: {workload.hidden} MLP on {workload.input_dim} features, batch "
          f"{workload.global_batch_size}, {args.repeats} interleaved repeats", flush=True)
    print("train.py settings: " + " ".join(HARNESS_SETTINGS), flush=True)
    result = bench.measure_throughput(contenders, repeats=args.repeats, on_run=_progress)
    print("\n| contender | wall ms/step: median | min | max | vs hand-written 100/call | "
          "CPU ms/step: median | vs hand-written |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        values = [1e3 * v for v in result.per_step[c.name]]
        print(f"| {c.name} | {result.median_ms(c.name):.2f} | {min(values):.2f} | {max(values):.2f} | "
              f"{result.ratio(c.name, BASELINE):.3f} | {1e3 * bench.median(result.cpu_per_step[c.name]):.2f} | "
              f"{result.ratio(c.name, BASELINE, cpu=True):.3f} |")
    print(f"\nload average during the runs: median {bench.median(result.load):.2f}, "
          f"max {max(result.load):.2f}; N1/N2 = {args.short_steps}/{args.long_steps} steps "
          f"(1 step/call: half; model.fit: 5/20 epochs of {steps_per_epoch} steps)", flush=True)


def _progress(name: str, steps: int, seconds: float) -> None:
    print(f"  {name}: {steps} steps in {seconds:.2f}s", file=sys.stderr, flush=True)


def stall(args: argparse.Namespace, work_dir: str) -> bench.StallResult:
    from train import train

    workload = bench.Workload(hidden=(2048, 2048), global_batch_size=64)
    overrides = [*workload.overrides(), "export.enabled=false"]
    result = bench.measure_checkpoint_stall(train, overrides, work_dir=work_dir, repeats=args.repeats,
                                            max_steps=280, every_steps=40)
    print(f"\n## Checkpoint stall: {workload.hidden} MLP + Adam, {result.checkpoint_bytes / 1e6:.1f} MB per "
          f"checkpoint, a save every 40 steps, {args.repeats} interleaved runs per mode")
    print("Blocked time = `perf/checkpoint_save_seconds`, what the controller waits for per save; the first "
          "save of each run (one-off set-up) is shown apart.\n")
    print("| checkpoint.async | saves | blocked per save, median | min | max | first save, median |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("sync", "async"):
        values = result.blocked[mode]
        print(f"| {mode == 'async'} | {len(values)} | {1e3 * bench.median(values):.1f} ms | "
              f"{1e3 * min(values):.1f} ms | {1e3 * max(values):.1f} ms | "
              f"{1e3 * bench.median(result.first_save[mode]):.1f} ms |")
    ratio = bench.median(result.blocked["async"]) / bench.median(result.blocked["sync"])
    print(f"\nasync blocked / sync blocked (medians): {ratio:.3f}", flush=True)
    return result


def restore(args: argparse.Namespace, work_dir: str, source_run_dir: str) -> None:
    workload = bench.Workload(hidden=(2048, 2048), global_batch_size=64)
    overrides = [*workload.overrides(), "export.enabled=false"]
    result = bench.measure_restore(overrides, workload, source_run_dir=source_run_dir, work_dir=work_dir,
                                   repeats=args.repeats)
    megabytes = result.checkpoint_bytes / 1e6
    restored = bench.median([t.marks["checkpoint restored"] for t in result.resumed])
    resume = bench.median([t.first_step for t in result.resumed])
    bare = bench.median(result.bare_import_build)
    print(f"\n## Restore: the {megabytes:.1f} MB checkpoint above, {args.repeats} interleaved repeats\n")
    print("| figure | median |")
    print("|---|---:|")
    print(f"| `python train.py ...`: launch -> checkpoint restored (log line) | {restored:.2f} s |")
    print(f"| `python train.py ...`: launch -> first resumed step logged | {resume:.2f} s |")
    print(f"| bare `import tensorflow, keras` + build the model (a child process) | {bare:.2f} s |")
    print(f"| difference: what resuming costs beyond importing and building | {resume - bare:.2f} s |")
    for cache in ("warm", "cold"):
        restore_s, plain_s = bench.median(result.restore_seconds[cache]), bench.median(result.plain_read_seconds[cache])
        print(f"| {cache} page cache: `Checkpointer.restore_latest` | {1e3 * restore_s:.0f} ms = "
              f"{megabytes / restore_s:.0f} MB/s |")
        print(f"| {cache} page cache: plain `readinto` of the same files | {1e3 * plain_s:.0f} ms = "
              f"{megabytes / plain_s:.0f} MB/s |")
    print("\n(cold = the files' pages dropped with posix_fadvise(DONTNEED) before each read)", flush=True)


def startup(args: argparse.Namespace, work_dir: str) -> None:
    result = bench.measure_startup(work_dir=work_dir, repeats=args.repeats)
    print(f"\n## Start-up: `python train.py model=mlp` (default config), {args.repeats} interleaved repeats\n")
    print("| what (launch -> the point a child reports) | median | min |")
    print("|---|---:|---:|")
    for what, values in result.seconds.items():
        print(f"| {what} | {bench.median(values):.2f} s | {min(values):.2f} s |")
    print("\nImports train.py adds to `import tensorflow` (self time, by top-level package):\n")
    print("| package | seconds |")
    print("|---|---:|")
    for package, seconds in result.extra_imports:
        print(f"| {package} | {seconds:.3f} |")


def checkpoint_io(args: argparse.Namespace, work_dir: str) -> None:
    results = bench.measure_checkpoint_io(args.state_gb, repeats=args.repeats, work_dir=work_dir)
    print(f"\n## Checkpoint I/O at scale: MLP 784-w-w-10 + Adam, {args.repeats} interleaved repeats per figure, "
          f"checkpoint files and raw I/O in {work_dir}\n")
    print_checkpoint_table(results)


def print_checkpoint_table(results: list[dict]) -> None:
    print("Ratios are medians of per-repeat ratios (harness / raw I/O of the same bytes, same filesystem, same "
          "repeat). Peak RSS added: VmHWM while saving and training on - the peak of training without saving, "
          "over the state's size.\n")
    print("| state | mode | figure | harness, median | raw I/O, median | ratio (median) | min-max ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for result in results:
        figures, label = result["figures"], f"{result['state_bytes'] / 1e9:.2f} GB (w={result['width']})"
        pairs = [("save: durable", "raw write + fsync", "save, written and fsynced")]
        if result["mode"] == "async":
            pairs.append(("save: training blocked", "raw write + fsync", "training blocked by the save"))
        else:
            pairs += [("restore (warm)", "raw read (warm)", "restore, warm cache"),
                      ("restore (cold)", "raw read (cold)", "restore, cold cache"),
                      ("restore (cold, first in the process)", "raw read (cold)",
                       "restore, cold cache, first in the process"),
                      ("restore (cold, fresh process)", "raw read (cold, fresh process)",
                       "restore, cold cache, in a fresh process (a resumed run)")]
        for mine, raw, what in pairs:
            ratios = [a / b for a, b in zip(figures[mine], figures[raw])]
            print(f"| {label} | {result['mode']} | {what} | {bench.median(figures[mine]):.2f} s | "
                  f"{bench.median(figures[raw]):.2f} s | {bench.median(ratios):.2f} | "
                  f"{min(ratios):.2f}-{max(ratios):.2f} |")
        added = figures["save: peak RSS added / state"]
        print(f"| {label} | {result['mode']} | peak RSS added by saving / state | {bench.median(added):.2f} (max "
              f"{max(added):.2f}) | training peak without saving: {result['baseline_rss_bytes'] / 1e9:.2f} GB | | |")
        for name, what in (("restore: peak RSS added / state", "peak RSS added by a restore / state"),
                           ("restore, fresh process: peak RSS added / state",
                            "peak RSS added by a restore in a fresh process / state")):
            if name in figures:
                print(f"| {label} | {result['mode']} | {what} | {bench.median(figures[name]):.2f} (max "
                      f"{max(figures[name]):.2f}) | | | |")
    cold = next((r["figures"]["cold cache by"][0] for r in results if "cold cache by" in r["figures"]), "-")
    print(f"\n(cold cache: {cold} before each cold read)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per figure (default 5)")
    parser.add_argument("--short-steps", type=int, default=500, help="N1 for train.py and the hand-written loop")
    parser.add_argument("--long-steps", type=int, default=2500, help="N2 for train.py and the hand-written loop")
    parser.add_argument("--variants", action="store_true", help="also time train.py with each speed option")
    parser.add_argument("--core", action="store_true", help="throughput of train.py and the baseline loop only")
    parser.add_argument("--state-gb", type=float, nargs="+", default=[0.1, 1.0, 2.0],
                        help="checkpoint section: state sizes in GB (default 0.1 1 2)")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if args.repeats < 1 or not 0 < args.short_steps < args.long_steps or any(
            steps % 100 for steps in (args.short_steps, args.long_steps)):
        parser.error("--repeats must be >= 1 and 0 < --short-steps < --long-steps, both multiples of 100")
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="harness-benchmark-")
    print(f"# Benchmark ({machine_line()})", flush=True)
    source_run_dir = None
    if "throughput" in args.sections:
        throughput(args, work_dir)
    if "stall" in args.sections or "restore" in args.sections:
        source_run_dir = stall(args, work_dir).example_run_dir
    if "restore" in args.sections:
        restore(args, work_dir, source_run_dir)
    if "startup" in args.sections:
        startup(args, work_dir)
    if "checkpoint" in args.sections:
        checkpoint_io(args, work_dir)
    if "data" in args.sections:  # data bigger than memory (--workdir of scripts/data_benchmark.py keeps the data)
        from scripts.tooling import data_benchmark

        data_args = data_benchmark.parse_arguments(["--repeats", str(min(args.repeats, 3))])
        print("\n".join(data_benchmark.run_data_section(data_args)), flush=True)


if __name__ == "__main__":
    main()
