"""Distribution: which `tf.distribute` strategy runs, which process is the chief, and how a
multi-worker job finds its peers (TF_CONFIG from Slurm/Kubernetes/flags; a local gang of workers).

Imports only `harness.config` and `harness.errors`.
"""
