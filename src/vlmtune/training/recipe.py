"""The LoRA fine-tuning recipe: set up, train, save.

Supported: a local, ModelScope or Hugging Face model with a chat template, Alpaca data,
LoRA on the language model, gradient checkpointing and resuming from the last checkpoint.
Tracking goes to SwanLab (offline by default), TensorBoard or nowhere.

Several processes (`torchrun`, `accelerate launch`, DeepSpeed through train.deepspeed) go
through the transformers Trainer. Every process loads the model and trains on its share
of each batch. Only the main process (rank 0) tracks, generates samples and writes the
adapter, processor files, config, manifest and loss plot. tests/test_distributed.py
runs two CPU processes with the gloo backend; DeepSpeed and FSDP have not been run here.

The output folder contains the adapter, the processor files (tokenizer, chat template,
image processor), `config.yaml` and `run_manifest.json` (settings, package versions,
dataset hashes, sample counts and final metrics), and `progress.jsonl` (steps, logged
metrics and checkpoints while training runs). SIGINT or SIGTERM during training stops
the run after the current step with a checkpoint, and the adapter is still saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlmtune.config import IMAGE_DATALOADER_WORKERS, RunConfig, config_to_dict, save_config
from vlmtune.data.conversation import Conversation
from vlmtune.data.loading import LoadedData, SkipReport, load_data
from vlmtune.inference.evaluation import EvalRun, build_prompts, write_report
from vlmtune.inference.export import model_card
from vlmtune.encoding.collator import ChatCollator, LengthGroupedSampler, SampleDataset, padding_share
from vlmtune.encoding.cache import encode_dataset
from vlmtune.encoding.encode import ConversationEncoder, EncodedSample, EncodingReport
from vlmtune.encoding.stats import length_stats
from vlmtune.errors import ConfigError, DataError, VlmtuneError, without_worker_traceback
from vlmtune.model.estimate import apply_lora_on_meta, build_meta_model, load_model_config
from vlmtune.model.loading import (
    LoadedModel,
    checkpointing_enabled,
    load_model,
    parameter_count_text,
    prepare_for_training,
    resolve_device,
)
from vlmtune.model.lora import INIT_WEIGHTS, apply_lora, count_parameters, load_initial_weights
from vlmtune.model.packing import PackedPositions
from vlmtune.outputs import BASE_SAMPLES, MODEL_CARD, share_weight_files
from vlmtune.training.batch_checks import BATCH_TOLERANCE, padding_free_difference, padding_mask_difference
from vlmtune.training.loss import token_mean_loss
from vlmtune.training.progress import (
    MetricsLogCallback,
    ProgressFileCallback,
    QuietProgressCallback,
    ShareWeightFilesCallback,
    StopOnSignalCallback,
)
from vlmtune.training.run_folder import RunFolder, dataset_hashes
from vlmtune.training.sampling import SampleGenerationCallback
from vlmtune.training.tracking import Tracking, check_swanlab_login, make_tracking

logger = logging.getLogger(__name__)

# Initialisations that change base weights, so the saved adapter must be converted.
CONVERTED_INITS = ("pissa", "olora")
MANIFEST_PACKAGES = ("vlmtune", "torch", "transformers", "peft", "accelerate", "datasets", "swanlab")


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class _Trainer(Trainer):
    """transformers' Trainer with vlmtune's length-grouped sampler (see encoding/collator.py).

    The sampler's order depends only on the seed and the epoch. transformers' own sampler
    draws from the global torch RNG, which dropout consumes differently on each process,
    so under torchrun the processes' orders would drift apart after the first epoch.
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, SampleDataset):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(dataset.lengths, self.args.per_device_train_batch_size, seed=seed)

    @functools.cached_property
    def _parameters_without_embeddings(self) -> int:
        return self.model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(self, inputs: dict) -> int:
        """transformers' estimate (6 x tokens x non-embedding parameters), with the parameters counted once.

        transformers counts them again for every micro-batch, a walk over all parameters that
        took 5% of an epoch on the tiny model.
        """
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        return 6 * inputs[main_input].numel() * self._parameters_without_embeddings


class CurrentIntervalsCallback(TrainerCallback):
    """Applies this run's logging, eval and save steps to a resumed run.

    transformers (5.25) restores them from the checkpoint's trainer_state.json, so a resume with
    another train.save_steps would otherwise keep saving at the old interval.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        state.compute_steps(args, state.max_steps)


class LoraRecipe:
    """One training run, read top to bottom: setup(), train(), save()."""

    def __init__(self, config: RunConfig, resume: bool = False, overwrite: bool = False, data: LoadedData | None = None):
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.output_dir = Path(config.train.output_dir)
        self.folder = RunFolder(self.output_dir, config, resume, overwrite, self.is_main_process)
        self.loaded: LoadedModel | None = None
        self.report: EncodingReport | None = None
        self.encoder: ConversationEncoder | None = None
        self.validation_samples: list[EncodedSample] = []
        self.validation_report: EncodingReport | None = None
        self.sampling: SampleGenerationCallback | None = None
        self.data: LoadedData | None = data
        self.tracking: Tracking | None = None
        self.trainer: Trainer | None = None
        self.metrics: dict[str, Any] = {}
        self.padding_share: float | None = None
        self.collator: ChatCollator | None = None
        self.gradient_checkpointing = False
        self.stop_on_signal: StopOnSignalCallback | None = None

    @property
    def is_main_process(self) -> bool:
        """True in single-process runs and in the rank-0 process of torchrun, accelerate or deepspeed.

        Read from the RANK variable those launchers set, so it is known before the Trainer
        starts the process group.
        """
        return int(os.environ.get("RANK", "0")) == 0

    def setup(self) -> None:
        self.folder.check()
        set_seed(self.config.train.seed)
        self._setup_data_and_model()
        self._setup_trainer()
        if not self.resume:  # a resumed run's config.yaml is replaced once train() has checked the steps left
            self.folder.save_config_at_start()

    def _setup_data_and_model(self) -> None:
        config = self.config
        # Read the data first: a bad example should fail before minutes of model loading.
        data = self.data or load_data(config.data)
        self.data = data
        conversations = data.train
        self._check_cpu_four_bit(bool(data.validation))
        self._check_lora_before_loading()
        check_swanlab_login(config.tracking)
        self.loaded = load_model(config.model, for_training=True, quantization=config.quantization)
        encoder = ConversationEncoder.from_settings(self.loaded.processor, self.loaded.stop_token_ids, config.data)
        self.encoder = encoder
        self._build_sample_prompts(encoder)
        self.report = encode_dataset(encoder, conversations, config.data, name="training")
        if self.resume:
            self.folder.warn_changed_encoding(self.report.key)
        if not self.report.samples:
            raise DataError(
                f"no sample is left to train on: all {len(conversations)} examples were dropped. "
                "Raise data.max_length or check the data files"
            )
        for row in length_stats(self.report.lengths, config.data.max_length):
            logger.info(
                "lengths of %s: %d samples, min %d, median %g, p95 %d, max %d tokens; %d over max_length",
                row.dataset, row.count, row.min, row.median, row.p95, row.max, row.over_max_length,
            )
        if data.validation:
            self.validation_report = encode_dataset(encoder, data.validation, config.data, name="validation")
            self.validation_samples = self.validation_report.samples
        total_tokens = sum(len(sample) for sample in self.report.samples)
        supervised = sum(sample.supervised_count for sample in self.report.samples)
        logger.info(
            "training on %d samples: %d tokens, %d supervised (%.0f%%)",
            len(self.report.samples),
            total_tokens,
            supervised,
            100 * supervised / total_tokens,
        )

        model = self.loaded.model
        self.gradient_checkpointing = self._resolve_gradient_checkpointing(model)
        prepare_for_training(model, self.gradient_checkpointing)
        self.loaded.model = apply_lora(model, config.lora)
        if config.lora.init_from is not None and not self.resume:
            load_initial_weights(self.loaded.model, config.lora.init_from)
        if config.lora.init in CONVERTED_INITS and self.is_main_process:
            self._save_initial_adapter()
        self.collator = self._make_collator()

    def _check_lora_before_loading(self) -> None:
        """Apply the LoRA settings to a meta-device copy of a local model, so their errors come before the weights load.

        A hub id is checked only once its weights are loaded, because reading its config here could
        mean a second download from a hub other than model.hub.
        """
        name = self.config.model.name_or_path
        if not Path(name).expanduser().is_dir():
            return
        apply_lora_on_meta(build_meta_model(load_model_config(name, self.config.model.trust_remote_code)), self.config.lora)

    def _resolve_gradient_checkpointing(self, model: torch.nn.Module) -> bool:
        setting = self.config.train.gradient_checkpointing
        if setting != "auto":
            return setting
        parameters = sum(parameter.numel() for parameter in model.parameters())
        enabled = checkpointing_enabled(setting, parameters)
        logger.info(
            "gradient checkpointing %s (train.gradient_checkpointing=auto, %s parameters)",
            "on" if enabled else "off", parameter_count_text(parameters),
        )
        return enabled

    def _make_collator(self) -> ChatCollator:
        """Use padding-free batches when asked for or when flash attention makes them cheap, and when
        the model computes them exactly as padded ones. Padded batches go without an attention mask
        when the model computes the same logits without it."""
        padded = self._padded_collator()
        setting = self.config.train.padding_free
        attention = getattr(self.loaded.model.config, "_attn_implementation", None) or "eager"
        if setting is False:
            return padded
        if setting == "auto" and "flash" not in attention:
            logger.info(
                "padding-free batches off: %s attention would compute a full mask over each packed row "
                "(train.padding_free=auto turns them on with flash attention)", attention,
            )
            return padded
        if self._eval_forward_breaks_training():
            logger.warning("padding-free batches off: checking them would run the 4-bit model in eval mode on CPU")
            return padded
        packed = dataclasses.replace(padded, positions=PackedPositions(self.loaded.model), padding_mask=True)
        difference = padding_free_difference(self.loaded.model, padded, packed, self.report.samples)
        if difference <= BATCH_TOLERANCE:
            logger.info("padding-free batches: packed and separate forward passes agree (difference %.1e)", difference)
            return packed
        message = (
            f"padding-free batches change this model's outputs (relative difference {difference:.3f} on two "
            f"training samples): {type(self.loaded.model.get_base_model()).__name__} does not separate samples "
            "that share a row"
        )
        if setting is True:
            raise ConfigError(f"train.padding_free=true: {message}. Set train.padding_free to false or auto")
        logger.warning("%s; training on padded batches (train.padding_free=auto)", message)
        return padded

    def _padded_collator(self) -> ChatCollator:
        """Return the padded-batch collator, without the attention mask where the model gives the same logits."""
        masked = ChatCollator(
            pad_token_id=self._pad_token_id(), supervised_logits_only=True, pixel_loader=self.encoder.pixel_values
        )
        if self._eval_forward_breaks_training():
            logger.info("padded batches keep their attention mask: checking them would run the 4-bit model in eval mode on CPU")
            return masked
        unmasked = dataclasses.replace(masked, padding_mask=False)
        difference = padding_mask_difference(self.loaded.model, masked, unmasked, self.report.samples)
        if difference <= BATCH_TOLERANCE:
            logger.info(
                "padded batches without an attention mask: right padding under causal attention leaves "
                "real tokens unchanged (difference %.1e on two training samples)", difference,
            )
            return unmasked
        logger.info(
            "padded batches keep their attention mask: without it this model's logits change (relative "
            "difference %.3f on two training samples)", difference,
        )
        return masked

    def _eval_forward_breaks_training(self) -> bool:
        """Tell whether a forward pass in eval mode would break training (4-bit on CPU, see _check_cpu_four_bit)."""
        return self.config.quantization.bits == 4 and resolve_device(self.config.model.device).type == "cpu"

    def _check_cpu_four_bit(self, has_validation: bool) -> None:
        """Stop before loading when 4-bit training on CPU would also have to evaluate.

        NOTE: bitsandbytes 0.50.2 repacks 4-bit weights in place for CPU inference once a layer
        runs in eval mode, and training steps after that fail. 8-bit CPU runs pass the same
        tests; GPU runs use other kernels and have not been tried.
        """
        config = self.config
        evaluates = has_validation or config.evaluation.generate
        if self._eval_forward_breaks_training() and evaluates:
            raise ConfigError(
                "quantization.bits=4 on CPU cannot also evaluate: bitsandbytes' CPU 4-bit inference breaks "
                "training afterwards. Set evaluation.generate=false and data.val_size=0 (and no data.validation), "
                "use quantization.bits=8, or train on a CUDA GPU"
            )

    @property
    def _initial_adapter_dir(self) -> Path:
        return self.output_dir / "initial_adapter"

    def _save_initial_adapter(self) -> None:
        """Keep the PiSSA/OLoRA starting point, which save() needs to convert the trained adapter.

        Those initialisations move the weights' principal directions from the base weights
        into the adapter. The conversion turns the result into an ordinary LoRA adapter, of
        twice the rank, that applies to the unchanged base model.
        """
        model = self.loaded.model
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(str(self._initial_adapter_dir))
        model.peft_config["default"].init_lora_weights = INIT_WEIGHTS[self.config.lora.init]

    def _training_arguments(self) -> TrainingArguments:
        train = self.config.train
        dtype = self.loaded.model.dtype
        workers = self._dataloader_workers()
        if train.dataloader_num_workers == "auto" and workers:
            logger.info(
                "images are processed when batched, in %d dataloader workers beside training (train.dataloader_num_workers=auto)",
                workers,
            )
        return TrainingArguments(
            output_dir=str(self.output_dir),
            num_train_epochs=train.num_train_epochs,
            max_steps=train.max_steps,
            per_device_train_batch_size=train.per_device_train_batch_size,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            learning_rate=train.learning_rate,
            lr_scheduler_type=train.lr_scheduler_type,
            warmup_steps=train.warmup_steps,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            logging_steps=train.logging_steps,
            save_steps=train.save_steps,
            eval_strategy="steps" if self.validation_samples else "no",
            train_sampling_strategy="group_by_length" if train.group_by_length else "random",
            eval_steps=train.eval_steps,
            per_device_eval_batch_size=train.per_device_train_batch_size,
            save_total_limit=train.save_total_limit,
            seed=train.seed,
            dataloader_num_workers=workers,
            # Workers are kept, so that each epoch and each evaluation do not start new ones.
            dataloader_persistent_workers=workers > 0,
            optim=train.optim,
            deepspeed=train.deepspeed,
            # DDP's search for parameters without gradients walks the autograd graph every step. Only
            # trainable vision parameters can lack them (a text-only batch skips the vision tower).
            ddp_find_unused_parameters=self._trains_vision_parameters(),
            bf16=str(dtype) == "torch.bfloat16",
            fp16=str(dtype) == "torch.float16",
            use_cpu=self.loaded.model.device.type == "cpu",
            remove_unused_columns=False,
            report_to=[],  # tracking callbacks are passed explicitly, see training/tracking.py
            # Progress bars only on a terminal: in a log file or the web UI's log view each redraw is another line.
            disable_tqdm=not sys.stderr.isatty(),
        )

    def _dataloader_workers(self) -> int:
        setting = self.config.train.dataloader_num_workers
        if setting != "auto":
            return setting
        # On CPU the workers would take cores from training: with 2 cores they made steps slower.
        if self.loaded.model.device.type == "cpu":
            return 0
        with_files = any(sample.image_sources for sample in self.report.samples)
        return IMAGE_DATALOADER_WORKERS if with_files else 0

    def _trains_vision_parameters(self) -> bool:
        counts = count_parameters(self.loaded.model)
        return any(counts.get(part, (0, 0))[0] for part in ("vision tower", "merger"))

    def _setup_trainer(self) -> None:
        if self.is_main_process:
            self.tracking = make_tracking(self.config.tracking, str(self.output_dir), config_to_dict(self.config))
        else:
            self.tracking = Tracking("none", None)
        stats = length_stats(self.report.lengths, self.config.data.max_length)
        self.tracking.record_config({"data_lengths": [row.as_dict() for row in stats]})

        # The stop handlers go in after the tracking callbacks, because SwanLab installs its own SIGINT
        # handler when its run starts, which would finish the run under the callbacks that still log to
        # it. They go in before the sample generations, so a stop during the baseline samples is handled.
        progress = ProgressFileCallback(self.output_dir)
        self.stop_on_signal = StopOnSignalCallback(progress)
        callbacks = [
            CurrentIntervalsCallback(), MetricsLogCallback(), progress, ShareWeightFilesCallback(), *self.tracking.callbacks, self.stop_on_signal,
        ]
        self.sampling = self._sample_generation_callback()
        if self.sampling is not None:
            callbacks.append(self.sampling)

        self._log_padding_share()
        self.trainer = _Trainer(
            model=self.loaded.model,
            args=self._training_arguments(),
            train_dataset=SampleDataset(self.report.samples),
            eval_dataset=SampleDataset(self.validation_samples) if self.validation_samples else None,
            data_collator=self.collator,
            callbacks=callbacks,
            compute_loss_func=token_mean_loss,
        )
        # MetricsLogCallback logs the records that these print as dicts.
        self.trainer.remove_callback(PrinterCallback)
        if self.trainer.pop_callback(ProgressCallback) is not None:
            self.trainer.add_callback(QuietProgressCallback)

    def _build_sample_prompts(self, encoder: ConversationEncoder) -> None:
        """Choose the prompts of the sample generations, and check their images before tracking starts."""
        evaluation = self.config.evaluation
        self.sample_prompts: list[Conversation] = []
        self.sample_references: list[str | None] = []
        if not evaluation.generate:
            return
        source = self.data.validation or self.data.train
        self.sample_prompts, self.sample_references = build_prompts(
            source, evaluation.num_data_prompts, evaluation.prompts, self.config.data.system_prompt
        )
        for prompt in self.sample_prompts:
            encoder.check_images(prompt)

    def _sample_generation_callback(self) -> SampleGenerationCallback | None:
        """Build the callback that generates replies to fixed prompts, or None when there is none to ask.

        Generations run on the main process only: the other processes wait for it at the next
        gradient synchronisation.
        """
        evaluation = self.config.evaluation
        if not self.sample_prompts or not self.is_main_process:
            return None
        return SampleGenerationCallback(
            self.loaded,
            self.sample_prompts,
            self.sample_references,
            evaluation,
            self.tracking,
            every_steps=self.config.train.eval_steps,
            thinking=self.config.data.thinking,
            pixel_limits=(self.config.data.min_pixels, self.config.data.max_pixels),
            base_without_adapter=self.config.lora.init not in CONVERTED_INITS,
            adapter_starts_empty=self.config.lora.init_from is None,
            base_samples_path=self.output_dir / BASE_SAMPLES,
            stopping=self.stop_on_signal.stopping if self.stop_on_signal is not None else None,
        )

    def _log_padding_share(self) -> None:
        """Log the padding share of one epoch's batches, grouped by length and in random order."""
        train = self.config.train
        if self.collator.positions is not None:
            logger.info("padding: none (padding-free batches)")
            self.padding_share = 0.0
            return
        lengths = [len(sample) for sample in self.report.samples]
        batch_size = train.per_device_train_batch_size
        random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(train.seed)).tolist()
        random_batches = [random_order[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
        grouped_batches = LengthGroupedSampler(lengths, batch_size, seed=train.seed).batches()
        grouped, shuffled = padding_share(lengths, grouped_batches), padding_share(lengths, random_batches)
        chosen = grouped if train.group_by_length else shuffled
        logger.info(
            "padding: %.1f%% of computed tokens (train.group_by_length=%s; %.1f%% grouped by length, %.1f%% in random order)",
            100 * chosen, train.group_by_length, 100 * grouped, 100 * shuffled,
        )
        self.padding_share = chosen

    def _pad_token_id(self) -> int:
        tokenizer = self.loaded.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.loaded.stop_token_ids[0]

    def train(self) -> None:
        checkpoint = self.folder.last_checkpoint() if self.resume else None
        if checkpoint is not None:
            *_, total_steps = self.trainer.set_initial_training_values(self.trainer.args, self.trainer.get_train_dataloader())
            self.folder.check_steps_left(Path(checkpoint), total_steps)
            self.folder.save_config_at_start()
            logger.info("resuming from %s", checkpoint)
        args = self.trainer.args
        if args.world_size > 1 and self.is_main_process:
            logger.info(
                "training on %d processes: a global batch of %d = %d per process x %d accumulation steps x %d processes",
                args.world_size, args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
                args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
            )
        started = time.time()
        try:
            result = self.trainer.train(resume_from_checkpoint=checkpoint)
        except VlmtuneError as error:  # an image that changed on disk, found by a dataloader worker
            raise without_worker_traceback(error) from None
        finally:
            self.tracking.finish()
        self.metrics = {**result.metrics, "global_step": result.global_step, "wall_seconds": time.time() - started}

    def evaluation_runs(self) -> list[EvalRun]:
        """Return the baseline and the last sample-generation run (the tracker has the ones in between)."""
        runs = self.sampling.runs if self.sampling is not None else []
        return [runs[0], runs[-1]] if len(runs) > 1 else runs

    def save(self) -> Path:
        """Write the adapter, processor files, config and run manifest; return the folder.

        Every process calls Trainer.save_model, because it gathers sharded weights (DeepSpeed
        ZeRO-3, FSDP) before the main process writes them. Everything else is written by the
        main process alone.
        """
        self.trainer.save_model(str(self.output_dir))
        if not self.is_main_process:
            return self.output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.config.lora.init in CONVERTED_INITS:
            self.loaded.model.save_pretrained(
                str(self.output_dir), path_initial_model_for_weight_conversion=str(self._initial_adapter_dir)
            )
            logger.info("converted the %s adapter so it loads on the unchanged base model", self.config.lora.init)
        share_weight_files(self.output_dir)
        self.loaded.processor.save_pretrained(str(self.output_dir))
        save_config(self.config, self.output_dir / "config.yaml")
        self._write_manifest()
        # peft's save_pretrained wrote its empty model-card template; this one describes the run.
        (self.output_dir / MODEL_CARD).write_text(model_card(self.output_dir), encoding="utf-8")
        logger.info("saved the adapter and run manifest to %s", self.output_dir)
        return self.output_dir

    def _write_manifest(self) -> None:
        manifest = {
            "config": config_to_dict(self.config),
            "base_model": self.loaded.path,
            "versions": _package_versions(),
            "datasets": dataset_hashes(self.config),
            "encoding_key": self.report.key,
            "samples": len(self.report.samples),
            "validation_samples": len(self.validation_samples),
            "length_stats": [row.as_dict() for row in length_stats(self.report.lengths, self.config.data.max_length)],
            **example_counts(self.data.report, self.report, self.validation_report),
            "system_prompts": system_prompt_counts(self.data.train),
            "metrics": self.metrics,
            "tracking_run": str(self.tracking.run_folder() or ""),
            # A resumed SwanLab run writes one run folder per training session; all of them make up the run.
            "tracking_runs": [str(run) for run in self.tracking.swanlab_runs()] if self.tracking.backend == "swanlab" else [],
        }
        if self.resume:
            manifest["metrics_note"] = "train_loss is transformers' mean over the last training session only"
        if self.sampling is not None and self.sampling.runs:
            write_report(self.evaluation_runs(), self.output_dir)
        write_loss_plot(self.trainer.state.log_history, self.output_dir / "loss.png")
        manifest_path = self.output_dir / "run_manifest.json"
        manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")


def system_prompt_counts(conversations: list[Conversation]) -> dict[str, Any]:
    """Count the training examples' system prompts, so that chat and serve can send the one they shared."""
    prompts = Counter(
        conversation.messages[0].text
        for conversation in conversations
        if conversation.messages and conversation.messages[0].role == "system"
    )
    most_common, count = prompts.most_common(1)[0] if prompts else (None, 0)
    with_prompt = sum(prompts.values())
    return {
        "distinct": len(prompts),
        "with": with_prompt,
        "without": len(conversations) - with_prompt,
        "most_common": most_common,
        "most_common_count": count,
    }


def example_counts(read: SkipReport, training: EncodingReport, validation: EncodingReport | None) -> dict[str, Any]:
    """Return the manifest's counts of examples left out or changed: invalid, duplicated, dropped and trimmed."""
    counts: dict[str, Any] = {
        "skipped_invalid": {reason: len(locations) for reason, locations in read.skipped.items()},
        "duplicates": len(read.duplicates),
        "validation_overlap": len(read.validation_overlap),
        "dropped": {reason: len(sources) for reason, sources in training.dropped.items()},
        "trimmed": training.trimmed,
    }
    if validation is not None:
        counts["validation_dropped"] = {reason: len(sources) for reason, sources in validation.dropped.items()}
        counts["validation_trimmed"] = validation.trimmed
    return counts


def write_loss_plot(log_history: list[dict], path: Path) -> Path | None:
    """Plot training and evaluation loss against the step, for people who skip the dashboard."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4))
    for points, label in ((train, "training loss"), (evaluation, "evaluation loss")):
        if points:
            axis.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


def run_training(
    config: RunConfig, resume: bool = False, overwrite: bool = False, data: LoadedData | None = None
) -> LoraRecipe:
    """Set up, train and save; returns the finished recipe for callers that inspect it.

    `data` is the result of `load_data(config.data)` when the caller has read it already.
    """
    recipe = LoraRecipe(config, resume=resume, overwrite=overwrite, data=data)
    recipe.setup()
    recipe.train()
    recipe.save()
    # Under several processes, all leave the process group together once the main one has written its
    # files. A process that exits while the group still runs its threads can abort at exit.
    recipe.trainer.accelerator.wait_for_everyone()
    recipe.trainer.accelerator.end_training()
    return recipe
