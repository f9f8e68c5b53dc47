"""Sample generations during training: a baseline before the first step, then every eval_steps."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from vlmtune.config import EvaluationSettings, GenerationSettings
from vlmtune.data.conversation import Conversation
from vlmtune.data.validate import conversation_key
from vlmtune.inference.evaluation import EvalRun, run_evaluation
from vlmtune.inference.metrics import ReplyMetrics
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
        base_samples_path: Path | None = None,
        stopping: threading.Event | None = None,
        adapter_starts_empty: bool = True,
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
        self.base_samples_path = base_samples_path
        """The file that keeps the base model's replies for a resumed run (None: they are not kept)."""
        self.adapter_starts_empty = adapter_starts_empty
        """Whether the adapter changes nothing at step 0 (not when lora.init_from loads trained weights)."""
        self.stopping = stopping
        """Set when training is asked to stop (StopOnSignalCallback): generation stops and is not recorded."""
        self.runs: list[EvalRun] = []

    def _generate(self, model, step: int, label: str) -> EvalRun | None:
        """Generate and record the sample replies, or return None when training is stopping."""
        if self.stopping is not None and self.stopping.is_set():
            logger.info("sample generation at step %d skipped: training is stopping", step)
            return None
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
                self.references, step, cancel=self.stopping,
            )
        finally:
            model.train(was_training)
        if run is None:
            logger.info("sample generation at step %d stopped: training is stopping", step)
            return None
        self._record(run)
        return run

    def _record(self, run: EvalRun) -> None:
        self.runs.append(run)
        self.tracking.log_metrics({f"samples/{key}": value for key, value in run.metrics.scalars().items()}, run.step)
        rows = [(sample["prompt"], sample["answer"] + ("" if sample["stopped"] else " [cut off]")) for sample in run.samples]
        self.tracking.log_texts("samples/generations", rows, run.step)

    def _base_key(self) -> str:
        """Hash what the base model's replies depend on: model, prompts, references and generation settings."""
        inputs = [
            self.loaded.path,
            [conversation_key(prompt) for prompt in self.prompts],
            self.references,
            self.settings.max_new_tokens,
            self.settings.style_patterns,
            self.thinking,
            self.pixel_limits,
        ]
        return hashlib.sha256(json.dumps(inputs, ensure_ascii=False, default=str).encode("utf-8")).hexdigest()

    def _save_base(self, run: EvalRun | None) -> None:
        if self.base_samples_path is None or run is None:
            return
        tree = {"key": self._base_key(), "label": run.label, "metrics": asdict(run.metrics), "samples": run.samples}
        self.base_samples_path.parent.mkdir(parents=True, exist_ok=True)
        self.base_samples_path.write_text(json.dumps(tree, ensure_ascii=False, indent=1), encoding="utf-8")

    def _saved_base(self) -> EvalRun | None:
        """Return the base replies saved by this run's first session, if the prompts and settings are unchanged."""
        path = self.base_samples_path
        if path is None or not path.is_file():
            return None
        try:
            tree = json.loads(path.read_text(encoding="utf-8"))
            if tree.get("key") != self._base_key():
                logger.info("the sample prompts or generation settings changed since %s was written; generating again", path)
                return None
            return EvalRun(tree["label"], 0, ReplyMetrics(**tree["metrics"]), tree["samples"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("%s is unreadable (%s); generating the base model's replies again", path, error)
            return None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and self.adapter_starts_empty:
            self._save_base(self._generate(model, 0, "base"))
        elif (saved := self._saved_base()) is not None:
            logger.info("resumed run: the base model's replies come from %s", self.base_samples_path)
            self._record(saved)
        elif self.base_without_adapter and hasattr(model, "disable_adapter"):
            # A resumed run, or one that starts from saved weights (lora.init_from): the base model is the
            # same model with the adapter switched off.
            with model.disable_adapter():
                self._save_base(self._generate(model, 0, "base"))
        else:
            logger.info("resumed run: no base-model column (the adapter's initialisation changed the base weights)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps == 0:
            self._generate(model, state.global_step, f"step {state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.runs or self.runs[-1].step != state.global_step:
            self._generate(model, state.global_step, f"step {state.global_step}")
