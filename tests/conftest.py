import os

# Two cores on CI: keep XLA from oversubscribing them.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
