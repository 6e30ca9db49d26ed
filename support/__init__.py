"""The plumbing the commands import: settings, runtime, the run's log, checkpoints and resume, the
NaN and signal guards, evaluation, Hugging Face and lm-evaluation-harness. Nothing here is run by
itself, and nothing here imports train_gpt or tools/ (the recipe and the self-measurement tools
import it, not the other way round)."""
