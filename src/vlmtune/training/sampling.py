"""Sample generations during training: a baseline before the first step, then every eval_steps."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from vlmtune.config import EvaluationSettings, GenerationSettings
from vlmtune.data.conversation import Conversation
from vlmtune.inference.evaluation import EvalRun, run_evaluation
from vlmtune.inference.generate import Generator
from vlmtune.model.loading import LoadedModel
from vlmtune.training.tracking import Tracking

logger = logging.getLogger(__name__)


class SampleGenerationCallback(TrainerCallback):
    """Generates replies to fixed prompts and logs their metrics and texts to the tracker.

    Runs at step 0 (the base model: LoRA's B matrices start at zero, so the adapter
    changes nothing yet), every `every_steps` optimizer steps, and once at the end.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        prompts: list[Conversation],
        references: list[str | None],
        settings: EvaluationSettings,
        tracking: Tracking,
        every_steps: int,
        thinking: str,
        pixel_limits: tuple[int | None, int | None],
        base_without_adapter: bool = True,
    ):
        self.loaded = loaded
        self.prompts = prompts
        self.references = references
        self.settings = settings
        self.tracking = tracking
        self.every_steps = every_steps
        self.thinking = thinking
        self.pixel_limits = pixel_limits
        self.base_without_adapter = base_without_adapter
        """Whether switching the adapter off gives the base model (not after PiSSA/OLoRA initialisation)."""
        self.runs: list[EvalRun] = []

    def _generate(self, model, step: int, label: str) -> None:
        loaded = LoadedModel(model=model, processor=self.loaded.processor, path=self.loaded.path)
        generator = Generator(
            loaded,
            GenerationSettings(max_new_tokens=self.settings.max_new_tokens),
            thinking=self.thinking,
            min_pixels=self.pixel_limits[0],
            max_pixels=self.pixel_limits[1],
        )
        was_training = model.training
        model.eval()
        try:
            run = run_evaluation(
                generator, self.prompts, label, self.settings.style_patterns, self.settings.max_new_tokens,
                self.references, step,
            )
        finally:
            model.train(was_training)
        self.runs.append(run)
        self.tracking.log_metrics({f"samples/{key}": value for key, value in run.metrics.scalars().items()}, step)
        rows = [(sample["prompt"], sample["answer"] + ("" if sample["stopped"] else " [cut off]")) for sample in run.samples]
        self.tracking.log_texts("samples/generations", rows, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._generate(model, 0, "base")
        elif self.base_without_adapter and hasattr(model, "disable_adapter"):
            # A resumed run: the base model is the same model with the adapter switched off.
            with model.disable_adapter():
                self._generate(model, 0, "base")
        else:
            logger.info("resumed run: no base-model column (the adapter's initialisation changed the base weights)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps == 0:
            self._generate(model, state.global_step, f"step {state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.runs or self.runs[-1].step != state.global_step:
            self._generate(model, state.global_step, f"step {state.global_step}")
