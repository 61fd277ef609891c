"""Text from a trained byte-level language model: what `scripts/generate.py` prints."""

from __future__ import annotations

from harness.data.in_memory_sources import BYTE_VOCABULARY
from harness.errors import HarnessError
from harness.results.inference import LoadedModel
from harness.tasks.language_model import LanguageModel, generate


def generate_text(loaded: LoadedModel, prompt: str, *, length: int, temperature: float, seed: int) -> str:
    """A byte-level language-model run's continuation of `prompt` (UTF-8), decoded leniently."""
    if not isinstance(loaded.task, LanguageModel) or loaded.task.num_outputs != BYTE_VOCABULARY:
        raise HarnessError(f"Run '{loaded.config.get('run_dir')}' trained task '{loaded.task.name}' with "
                           f"{loaded.task.num_outputs} outputs: expected a byte-level language model "
                           "(task=language_model with data=text) to sample text from.")
    tokens = generate(loaded.model, list(prompt.encode("utf-8")), length=length, context=loaded.input_shape[0],
                      temperature=temperature, seed=seed)
    return bytes(tokens).decode("utf-8", errors="replace")
