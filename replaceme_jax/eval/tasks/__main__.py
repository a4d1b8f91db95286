"""Print the task directory, for the harness CLI: lm_eval --include_path "$(python -m replaceme_jax.eval.tasks)"."""
from replaceme_jax.eval.tasks import TASKS_DIR

print(TASKS_DIR)
