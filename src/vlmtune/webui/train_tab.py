"""The Train tab: a form over a preset, a preview of encoded samples, and a training run to follow."""

from __future__ import annotations

import html
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas

from vlmtune.config import RunConfig
from vlmtune.errors import VlmtuneError
from vlmtune.outputs import earlier_run_files
from vlmtune.webui.forms import (
    TrainForm,
    build_run_config,
    list_presets,
    preset_form_values,
    preview_samples,
    shell_command,
    train_command,
    write_run_config,
)
from vlmtune.webui.jobs import JobManager

logger = logging.getLogger(__name__)

PREVIEW_COUNT = 3
COLOR_MAP = {"supervised": "green", "masked": "gray", "image": "purple"}
THINKING_LAYOUTS = ["auto", "think_answer", "think", "none"]


def error_text(error: Exception) -> str:
    """Format an error for the page: user errors as they are, anything else with its type."""
    if isinstance(error, VlmtuneError):
        return f"**Error:** {error}"
    return f"**Error:** {type(error).__name__}: {error}"


def log_error(action: str, error: Exception) -> None:
    """Log an error shown in the page: one line for user errors, the traceback for anything else."""
    if isinstance(error, VlmtuneError):
        logger.warning("%s: %s", action, error)
    else:
        logger.exception(action)


def loss_frame(losses: list[tuple[int, float]], eval_losses: list[tuple[int, float]]) -> pandas.DataFrame:
    """Return the loss points as the long table gr.LinePlot draws, one series per loss."""
    points = [(step, loss, "training") for step, loss in losses]
    points += [(step, loss, "evaluation") for step, loss in eval_losses]
    # Explicit dtypes even when empty, because the plot picks quantitative or nominal axes from them.
    return pandas.DataFrame(
        {
            "step": pandas.Series([point[0] for point in points], dtype="int64"),
            "loss": pandas.Series([point[1] for point in points], dtype="float64"),
            "series": pandas.Series([point[2] for point in points], dtype="str"),
        }
    )


def progress_html(step: int, max_steps: int, state: str) -> str:
    fraction = step / max_steps if max_steps > 0 else 0.0
    return (
        f'<div id="train-progress-box"><progress id="train-progress-bar" value="{step}" max="{max(max_steps, 1)}" '
        f'style="width:100%"></progress><div>{html.escape(state)}: step {step} / {max_steps or "?"} '
        f"({fraction:.0%})</div></div>"
    )


class TrainTab:
    """Builds the tab's components and runs `vlmtune train` jobs through a JobManager."""

    def __init__(
        self, jobs: JobManager, model: str | None, outputs_dir: str, presets_dir: str, i18n: Callable[[str], Any]
    ):
        self.jobs = jobs
        self.model = model or ""
        self.outputs_dir = outputs_dir
        self.presets_dir = presets_dir
        self.i18n = i18n

    def build(self) -> None:
        t = self.i18n
        presets = list_presets(self.presets_dir)
        default_preset = next((preset for preset in presets if Path(preset).name == "demo.yaml"), presets[0] if presets else None)
        if not presets:
            logger.warning(
                "no YAML presets in %s, so the Train tab's form starts from vlmtune's defaults and a run cannot start "
                "until a preset is chosen; pass --presets FOLDER (the configs folder of the vlmtune repository has them)",
                Path(self.presets_dir).resolve(),
            )

        with gr.Row():
            with gr.Column():
                self.dataset = gr.Textbox(label=t("dataset"), elem_id="train-dataset")
                self.upload = gr.File(label=t("upload_dataset"), file_types=[".json", ".jsonl", ".csv", ".parquet"], height=140)
                self.model_box = gr.Textbox(label=t("base_model"), value=self.model, elem_id="train-model")
                self.output_dir = gr.Textbox(
                    label=t("output_dir"), value=str(Path(self.outputs_dir) / "webui-run"), elem_id="train-output"
                )
                self.preset = gr.Dropdown(
                    choices=presets, value=default_preset, label=t("preset"), allow_custom_value=True, elem_id="train-preset"
                )

            epochs, learning_rate, rank, max_length, thinking, max_steps = self._preset_values(default_preset)
            with gr.Column():
                with gr.Row():
                    self.epochs = gr.Number(value=epochs, label=t("epochs"), minimum=0.01, elem_id="train-epochs")
                    self.learning_rate = gr.Number(value=learning_rate, label=t("learning_rate"), minimum=0)
                with gr.Row():
                    self.lora_rank = gr.Number(value=rank, label=t("lora_rank"), precision=0, minimum=1)
                    self.max_length = gr.Number(value=max_length, label=t("max_length"), precision=0, minimum=1)
                self.thinking = gr.Dropdown(choices=THINKING_LAYOUTS, value=thinking, label=t("thinking"))
                with gr.Accordion(t("more_settings"), open=False, elem_id="train-more"):
                    self.max_steps = gr.Number(value=max_steps, label=t("max_steps"), precision=0, elem_id="train-max-steps")
                    self.overwrite = gr.Checkbox(label=t("overwrite"), value=False, elem_id="train-overwrite")
                with gr.Row():
                    self.preview = gr.Button(t("preview"), elem_id="train-preview")
                    self.start = gr.Button(t("start"), variant="primary", elem_id="train-start")
                    self.resume = gr.Button(t("resume"), elem_id="train-resume")
                    self.stop = gr.Button(t("stop"), variant="stop", elem_id="train-stop")

        self.status = gr.Markdown(elem_id="train-status")
        self.samples = [
            gr.HighlightedText(label=t("preview_sample"), color_map=COLOR_MAP, show_legend=True, visible=False,
                               elem_id=f"train-sample-{index}")
            for index in range(PREVIEW_COUNT)
        ]

        self.command = gr.Textbox(label=t("command"), interactive=False, elem_id="train-command")
        self.progress = gr.HTML(progress_html(0, 0, "idle"), label=t("progress"))
        self.loss_plot = gr.LinePlot(
            loss_frame([], []), x="step", y="loss", color="series", label=t("loss"), elem_id="train-loss"
        )
        self.log = gr.Textbox(label=t("log"), lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="train-log")
        self.timer = gr.Timer(1.0)
        self._wire()

    @staticmethod
    def _preset_values(preset: str | None) -> list[Any]:
        """Return the preset's values for the settings fields, or vlmtune's defaults when it cannot be read."""
        defaults = [3.0, 1e-4, 8, 1024, "auto", -1]
        if not preset:
            return defaults  # build() has warned that the presets folder has none
        try:
            return preset_form_values(preset)
        except VlmtuneError as error:
            logger.warning("%s; the form starts from vlmtune's defaults", error)
            return defaults

    def fill_from_preset(self, preset: str) -> list[Any]:
        """Show the chosen preset's values in the settings fields, which override the preset when a run starts."""
        return self._preset_values(preset)

    def form_inputs(self) -> list:
        return [self.dataset, self.model_box, self.output_dir, self.preset, self.epochs, self.learning_rate,
                self.lora_rank, self.max_length, self.thinking, self.max_steps]

    def _wire(self) -> None:
        job_views = [self.status, self.command, self.progress, self.loss_plot, self.log]
        self.upload.upload(self.keep_upload, [self.upload], [self.dataset])
        # .input, not .change: a page that restores a running job's form sets the preset too.
        settings = [self.epochs, self.learning_rate, self.lora_rank, self.max_length, self.thinking, self.max_steps]
        self.preset.input(self.fill_from_preset, [self.preset], settings)
        self.preview.click(self.show_preview, self.form_inputs(), [self.status, *self.samples])
        self.start.click(self.start_run, [*self.form_inputs(), self.overwrite], [self.status, self.command])
        self.resume.click(self.resume_run, self.form_inputs(), [self.status, self.command])
        self.stop.click(self.stop_run, None, [self.status])
        self.timer.tick(self.job_view, None, job_views[1:])

    @staticmethod
    def _form(dataset, model, output_dir, preset, epochs, learning_rate, lora_rank, max_length, thinking, max_steps) -> TrainForm:
        return TrainForm(
            dataset=(dataset or "").strip(),
            model=(model or "").strip(),
            output_dir=(output_dir or "").strip(),
            preset=preset or "",
            num_train_epochs=float(epochs or 1),
            learning_rate=float(learning_rate or 1e-4),
            lora_rank=int(lora_rank or 8),
            max_length=int(max_length or 1024),
            thinking=thinking or "auto",
            max_steps=int(max_steps if max_steps is not None else -1),
        )

    def keep_upload(self, uploaded: str | None) -> str:
        """Copy an uploaded dataset next to the runs, because Gradio's upload cache is temporary."""
        if not uploaded:
            return ""
        folder = Path(self.outputs_dir) / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / Path(uploaded).name
        shutil.copyfile(uploaded, target)
        logger.info("kept uploaded dataset as %s", target)
        return str(target)

    def show_preview(self, *values) -> list:
        hidden = [gr.HighlightedText(value=None, visible=False) for _ in self.samples]
        try:
            config = build_run_config(self._form(*values))
            previews = preview_samples(config, PREVIEW_COUNT)
        except Exception as error:  # shown in the page instead of a traceback
            log_error("preview failed", error)
            return [error_text(error), *hidden]
        lines = []
        for index, preview in enumerate(previews, start=1):
            lines.append(f"**Sample {index}** ({preview.source})")
            if preview.check is not None:
                lines[-1] += (
                    f": self-check **{'ok' if preview.check.ok else 'FAILED'}**; prompt matches the inference "
                    f"template: {preview.check.prompt_matches_template}; ends with a stop token: "
                    f"{preview.check.ends_with_stop_token}; supervised tokens: {preview.check.supervised_tokens} of "
                    f"{preview.length} (max_length {preview.max_length})"
                )
                lines += [f"  - {problem}" for problem in preview.check.problems]
            if preview.note is not None:
                lines.append(f"  - {preview.note}")
        samples = [gr.HighlightedText(value=preview.segments, visible=bool(preview.segments)) for preview in previews]
        return ["\n\n".join(lines) or "The dataset has no example.", *samples, *hidden[len(samples):]]

    def start_run(self, *values) -> tuple[str, str]:
        *form_values, overwrite = values
        try:
            config = build_run_config(self._form(*form_values))
            output_dir = Path(config.train.output_dir)
            if not overwrite and earlier_run_files(output_dir):
                return (
                    f"**Error:** the output folder {output_dir} contains an earlier run. Click Resume to continue it "
                    "from its last checkpoint, tick 'Replace an earlier run in this folder' under More, or choose "
                    "another output folder.",
                    "",
                )
            return self._run(config, form_values, overwrite=bool(overwrite))
        except Exception as error:  # shown in the page instead of a traceback
            log_error("starting the training run failed", error)
            return error_text(error), ""

    def resume_run(self, *form_values) -> tuple[str, str]:
        """Continue the run in the output folder from its last checkpoint, as `vlmtune train --resume` does.

        The form's settings go into the config again, and the resumed run compares them with
        the ones it started with: changed LoRA settings stop it, other changes are logged.
        """
        try:
            config = build_run_config(self._form(*form_values))
            output_dir = Path(config.train.output_dir)
            if not any(output_dir.glob("checkpoint-*")):
                return (
                    f"**Error:** the output folder {output_dir} contains no checkpoint to resume from. Click Start "
                    "to begin a run there.",
                    "",
                )
            return self._run(config, form_values, resume=True)
        except Exception as error:  # shown in the page instead of a traceback
            log_error("resuming the training run failed", error)
            return error_text(error), ""

    def _run(
        self, config: RunConfig, form_values: list[Any], overwrite: bool = False, resume: bool = False
    ) -> tuple[str, str]:
        """Write the config into the output folder and start `vlmtune train` on it."""
        config_path = write_run_config(config)
        command = train_command(config_path, overwrite=overwrite, resume=resume)
        typed_command = shell_command(command)
        self.jobs.start(
            command, typed_command, config.train.output_dir, form=list(form_values), overwrite=overwrite, resume=resume
        )
        return f"{'Resumed' if resume else 'Started'}; the config is {config_path}.", typed_command

    def stop_run(self) -> str:
        job = self.jobs.job
        if job is None or job.return_code is not None:
            return "No training run is active."
        self.jobs.stop()
        return "Stopping: the run saves a checkpoint after the current step, then the adapter. Click Stop again to interrupt at once."

    def restore_form(self) -> list[Any]:
        """Return the form values of the server's current job, so a page opened later can stop or resume it."""
        job = self.jobs.job
        if job is None or job.form is None:
            return [gr.update() for _ in self.form_inputs()]
        return list(job.form)

    def job_view(self) -> tuple:
        """Return the command, progress bar, loss chart and log of the server's current job."""
        job = self.jobs.job
        if job is None:
            return "", progress_html(0, 0, "idle"), loss_frame([], []), ""
        progress = job.progress()
        state = job.state
        if state in ("finished", "stopped") and (job.output_dir / "adapter_config.json").is_file():
            state += f"; adapter saved to {job.output_dir}"
        elif state == "failed":
            state += f" (exit code {job.return_code}); see the log"
        return (
            job.shell_command,
            progress_html(progress.step, progress.max_steps, state),
            loss_frame(progress.losses, progress.eval_losses),
            job.log_tail(),
        )
