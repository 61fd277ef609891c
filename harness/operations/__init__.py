"""Unattended operation: one writer per checkpoint.dir (lease), the run record and crash-loop check
(attempt), the hang watchdog, stop signals (preemption) and the process's exit.

Imports `harness.checkpoint` (the writable check before a run starts), `harness.config`,
`harness.distributed`.
"""
