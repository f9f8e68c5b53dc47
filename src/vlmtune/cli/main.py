"""The `vlmtune` command: one thin subcommand per stage."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.text import Text

from vlmtune.cli.logs import hide_kernel_lookup_warnings, show_repeated_warnings_once
from vlmtune.errors import VlmtuneError
from vlmtune.outputs import CHECKPOINT_NAME

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LoRA fine-tuning of chat and vision-language models (GLM-4.1V first), tracking and chat.",
)
console = Console()
error_console = Console(stderr=True)

DEFAULT_CORPUS = Path("data/persona_zh/train.json")

# Options shared by the commands that load a model for generation.
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="Base or merged model: local folder, ModelScope or Hugging Face id. Default: the adapter's base."),
]
AdapterOption = Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder from `vlmtune train`.")]
HubOption = Annotated[
    Literal["auto", "local", "modelscope", "huggingface"],
    typer.Option("--hub", help="Where --model lives. auto: a local folder if one exists at that path, else the Hugging Face Hub."),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet or int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun, accelerate or deepspeed, processes other than rank 0 log only
        # warnings and errors, so each decision is logged once.
        level = logging.WARNING
    if error_console.is_terminal:
        handler: logging.Handler = RichHandler(console=error_console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        # Piped or redirected: one unwrapped line per record, easy to grep.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        hide_kernel_lookup_warnings()
        show_repeated_warnings_once()


def _print_version(value: bool) -> None:
    if value:
        import importlib.metadata

        console.print(f"vlmtune {importlib.metadata.version('vlmtune')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _setup_logging(verbose, quiet)
    if quiet or not sys.stderr.isatty():
        # In a log file or the web UI's log view every progress-bar redraw is another line. These
        # variables turn off the bars of huggingface_hub and transformers (weights loading, shard
        # writing) and of datasets (encoding). The packages read them when they are imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


@app.command("tiny-model")
def tiny_model(
    output_dir: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    corpus: Annotated[
        Optional[list[Path]],
        typer.Option(help="Text, JSON or JSONL file(s) to train the tokenizer on. Default: data/persona_zh/train.json if present."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    architecture: Annotated[
        Literal["glm4v", "glm4.5v", "qwen2.5-vl", "qwen2.5"],
        typer.Option(help="Model family: GLM-4.1V (the demo's), GLM-4.5V (mixture of experts), Qwen2.5-VL, or the text-only Qwen2.5."),
    ] = "glm4v",
) -> None:
    """Write a tiny checkpoint with random weights (GLM-4.1V-shaped by default) for tests and the demo."""
    from vlmtune.model.tiny import FALLBACK_CORPUS, VOCAB_SIZE, build_tiny_glm4v_moe, build_tiny_model, check_tiny_output_dir
    from vlmtune.model.tiny_qwen import build_tiny_qwen2, build_tiny_qwen2_5_vl

    builders = {
        "glm4v": build_tiny_model,
        "glm4.5v": build_tiny_glm4v_moe,
        "qwen2.5-vl": build_tiny_qwen2_5_vl,
        "qwen2.5": build_tiny_qwen2,
    }
    check_tiny_output_dir(output_dir)  # before the tokenizer trains, so a mistyped path fails at once
    corpus_files = corpus or []
    if not corpus_files and DEFAULT_CORPUS.is_file():
        corpus_files = [DEFAULT_CORPUS]
    for path in corpus_files:
        if not path.is_file():
            raise VlmtuneError(f"--corpus: file not found: {path}")
    if not corpus_files:
        logging.getLogger(__name__).warning(
            "no --corpus given and %s not found in %s, so the tokenizer is trained on %d built-in sentences only: "
            "its vocabulary is a few hundred tokens instead of %d, and most text is split into single bytes. "
            "Pass --corpus FILE (text, JSON or JSONL; repeat it for several files), or run from the vlmtune repository root.",
            DEFAULT_CORPUS,
            Path.cwd(),
            len(FALLBACK_CORPUS),
            VOCAB_SIZE,
        )
    path = builders[architecture](output_dir, corpus_files, seed=seed)
    console.print(f"tiny model written to {path}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/demo.yaml.")],
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="SECTION.KEY=VALUE overrides, e.g. train.max_steps=20.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint-N in train.output_dir.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an earlier run in train.output_dir (checkpoints, adapter, reports, logs) and start afresh.")
    ] = False,
) -> None:
    """LoRA-fine-tune a model on the config's datasets and save the adapter."""
    from vlmtune.config import load_config
    from vlmtune.data.loading import load_data

    # The config and the data are checked before torch and transformers load, so a mistake shows in a moment.
    run_config = load_config(config, overrides)
    if resume and overwrite:
        raise VlmtuneError("--resume and --overwrite contradict each other; pass one of them")
    data = load_data(run_config.data)
    from vlmtune.training.run_folder import RunFolder

    # The output folder too, before the seconds that importing torch and transformers takes. The recipe checks it again.
    RunFolder(Path(run_config.train.output_dir), run_config, resume, overwrite, int(os.environ.get("RANK", "0")) == 0).check()
    from vlmtune.training.recipe import run_training

    resume_command = shlex.join([_program(), "train", str(config), *(overrides or []), "--resume"])
    try:
        recipe = run_training(run_config, resume=resume, overwrite=overwrite, data=data)
    except KeyboardInterrupt:
        output_dir = Path(run_config.train.output_dir)
        if any(CHECKPOINT_NAME.fullmatch(path.name) for path in output_dir.glob("checkpoint-*")):
            hint = f"continue from its last checkpoint with: {resume_command}"
        else:
            start_command = [_program(), "train", str(config), *(overrides or []), *(["--overwrite"] if overwrite else [])]
            hint = f"no checkpoint was saved, so start it again with: {shlex.join(start_command)}"
        # A second Ctrl-C can arrive while the adapter is being written, so it may exist but be incomplete.
        error_console.print(
            f"training interrupted before the run finished saving (the adapter and reports in {output_dir} are missing "
            f"or incomplete); {hint}",
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(128 + signal.SIGINT) from None
    if not recipe.is_main_process:
        return  # rank 0 prints the summary once
    runs = recipe.evaluation_runs()
    if runs:
        from vlmtune.inference.evaluation import comparison_table

        console.print(comparison_table(runs))
        console.print(f"replies and metrics: {recipe.output_dir / 'eval_report.md'}", soft_wrap=True)
    console.print(f"\nadapter saved to {recipe.output_dir}", soft_wrap=True)
    stopped_by = recipe.stop_on_signal.requested if recipe.stop_on_signal is not None else None
    if stopped_by:
        state = recipe.trainer.state
        console.print(
            f"training stopped by {stopped_by} at step {state.global_step} of {state.max_steps}; "
            f"continue it with: {resume_command}",
            soft_wrap=True,
            markup=False,
        )
    console.print(recipe.tracking.describe(), soft_wrap=True, markup=False)
    console.print(f"chat with it: {shlex.join([_program(), 'chat', '--adapter', str(recipe.output_dir)])}", soft_wrap=True)
    if stopped_by:
        # The shell's status for a process ended by that signal, so `train && export` does not go on.
        raise typer.Exit(128 + signal.Signals[stopped_by].value)


def _check_port_free(host: str, port: int) -> None:
    """Raise VlmtuneError unless host:port can be bound now, so a busy port fails before the model loads.

    The probe sets SO_REUSEADDR, as asyncio's create_server does for uvicorn on POSIX, so a port left in
    TIME_WAIT counts as free. NOTE: another program can still take the port between this check and the start.
    """
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise VlmtuneError(f"--host: cannot resolve {host!r} ({error.strerror}); pass an IP address such as 127.0.0.1") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = "the port is already in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise VlmtuneError(f"cannot listen on {host}:{port}: {reason}; pass another --port") from None


def _program() -> str:
    """Return how to type vlmtune in the printed commands: its name when PATH finds this one, else its path."""
    invoked = Path(sys.argv[0])
    found = shutil.which(invoked.name)
    if invoked.name == "vlmtune" and found is not None and Path(found).resolve() == invoked.resolve():
        return "vlmtune"
    return str(invoked) if invoked.name == "vlmtune" else "vlmtune"


@app.command()
def inspect(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="SECTION.KEY=VALUE overrides.")] = None,
    count: Annotated[
        int,
        typer.Option(
            "--count", "-n", min=1,
            help="Number of training samples to show, from the first (the training split is shuffled when data.val_size > 0).",
        ),
    ] = 3,
    find: Annotated[
        Optional[str],
        typer.Option(help="Show only samples whose source (file, record, line) or text contains this, e.g. 'record 12 ' or a word."),
    ] = None,
) -> None:
    """Show encoded samples (supervised tokens in green) and check them against inference rendering.

    Each sample goes through data.max_length and data.on_overlength as in training: a trimmed
    sample is shown as trained, and one that training skips or stops at is marked as such.
    """
    from vlmtune.config import load_config

    run_config = load_config(config, overrides)
    from vlmtune.data.loading import load_conversations

    conversations = load_conversations(run_config.data)
    if find is not None:
        conversations = [
            conversation for conversation in conversations
            if find in f"{conversation.source} " or any(find in message.text for message in conversation.messages)
        ]
        if not conversations:
            raise VlmtuneError(f"--find {find!r}: no training sample's source or text contains it")
    if count > len(conversations):
        console.print(f"showing all {len(conversations)} sample(s): there are fewer than --count {count}", soft_wrap=True)
    conversations = conversations[:count]
    from vlmtune.encoding import check_sample, encode_with_policy, render_sample

    encoder = _encoder_for(run_config)
    settings = run_config.data
    # Without a terminal (a pipe or a file) there is no colour, so brackets mark the supervised tokens.
    markers = not console.is_terminal
    if markers:
        console.print("supervised tokens are shown between ⟦ and ⟧")
    failures = 0
    for conversation in conversations:
        console.rule(conversation.source)
        [outcome] = encode_with_policy(encoder, [conversation], settings)
        note = outcome.note(settings.max_length)
        if note is not None:
            colour = "red" if outcome.error is not None else "yellow"
            console.print(f"[{colour}]{escape(note)}[/{colour}]", soft_wrap=True)
        if outcome.sample is None:
            failures += outcome.error is not None
            continue
        sample = outcome.sample
        check = check_sample(encoder, outcome.conversation, sample)
        console.print(render_sample(encoder, sample, markers), soft_wrap=True)
        status = "[green]ok[/green]" if check.ok else "[red]FAILED[/red]"
        console.print(
            f"\nself-check {status}: prompt matches the inference template: {check.prompt_matches_template}; "
            f"ends with a stop token: {check.ends_with_stop_token}; supervised tokens: {check.supervised_tokens} "
            f"of {len(sample)}"
        )
        for problem in check.problems:
            console.print(f"  [red]{problem}[/red]")
        failures += not check.ok
    if failures:
        raise typer.Exit(1)


@app.command("eval")
def evaluate(
    config: Annotated[Path, typer.Argument(help="YAML config of the run (model, data, evaluation sections).")],
    adapter: Annotated[Optional[str], typer.Option(help="Adapter folder to compare with the base model.")] = None,
    merged: Annotated[Optional[str], typer.Option(help="Merged model folder to compare with the base model.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Dataset file to take prompts from. Default: the config's validation data, else its training data.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Number of dataset prompts. Default: evaluation.num_data_prompts.")] = None,
    output: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder for eval_report.json and .md. Default: ADAPTER/eval; for --merged, eval_merged/NAME in the "
            "training run's folder it was exported from, else in the working folder.",
        ),
    ] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="SECTION.KEY=VALUE overrides.")] = None,
) -> None:
    """Compare the base model with an adapter or merged model on sample generations and on the data's reply loss."""
    from vlmtune.config import load_config

    run_config = load_config(config, overrides)
    from vlmtune.inference.evaluation import comparison_table, default_report_dir, evaluate_against_base, write_report

    runs = evaluate_against_base(run_config, adapter=adapter, merged=merged, data_path=data, count=count)
    console.print(comparison_table(runs))
    folder = output or default_report_dir(adapter, merged)
    json_path, markdown_path = write_report(runs, folder)
    console.print(f"report written to {json_path} and {markdown_path}", soft_wrap=True)


@app.command()
def predict(
    data: Annotated[str, typer.Option(help="Dataset file or folder, in any layout vlmtune reads; replies are optional.")],
    output: Annotated[
        Path,
        typer.Option(help="JSONL file to write. Examples already in it are skipped, after checking that the same model, adapter and prompt produced them."),
    ],
    model: ModelOption = None,
    adapter: AdapterOption = None,
    hub: HubOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Conversations generated together (left-padded).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Maximum tokens per reply.")] = 512,
    system: Annotated[Optional[str], typer.Option(help="System prompt for examples without one. Default: the training run's (adapter or merged model); '' for none.")] = None,
    device: DeviceOption = "auto",
    on_invalid: Annotated[
        str, typer.Option(help="error: stop at the first invalid example. skip: skip it, and log a table of reasons at the end.")
    ] = "error",
) -> None:
    """Generate a reply for every example of a dataset and write JSONL (resumable)."""
    from vlmtune.config import DatasetSpec
    from vlmtune.data.loading import SkipReport, load_dataset_file
    from vlmtune.inference.cli_chat import load_generator, system_prompt_for
    from vlmtune.inference.predict import check_output_file, cut_off_count, pending_examples, producer_labels
    from vlmtune.inference.predict import predict as run_predict
    from vlmtune.model.loading import adapter_base_model, check_adapter_folder

    if adapter:
        check_adapter_folder(adapter)  # before the resume check, which would blame a mistyped folder on --output
    if on_invalid not in ("error", "skip"):
        raise VlmtuneError(f"--on-invalid: expected error or skip, got {on_invalid!r}")
    report = SkipReport()
    conversations = load_dataset_file(
        DatasetSpec(path=data), system_prompt_for(system, adapter, model), on_invalid, report, prompts_only=True,
        skip_hint="pass --on-invalid skip",
    )
    report.log()
    if not conversations:
        raise VlmtuneError(f"--data {data}: no valid example to predict; see the skipped examples above")
    base = model or (adapter_base_model(adapter) if adapter else None)
    check_output_file(output)
    # Rows already in --output are checked before the model loads, so a mismatch fails at once.
    if not pending_examples(conversations, output, producer_labels(base, adapter), log=False):
        console.print(f"every example already has a prediction in {output}; nothing to do", soft_wrap=True)
        _print_scores(output)
        return
    generator = load_generator(model, adapter, hub, {"max_new_tokens": max_new_tokens}, "auto", device)
    received = [signal.SIGINT]

    def stop_on_sigterm(signum, frame) -> None:
        received[0] = signal.SIGTERM
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        written = run_predict(generator, conversations, output, batch_size=batch_size, model=base, adapter=adapter)
    except KeyboardInterrupt:
        pending = pending_examples(conversations, output, producer_labels(base, adapter), log=False)
        error_console.print(
            f"predict interrupted by {signal.Signals(received[0]).name}: {len(conversations) - len(pending)} of "
            f"{len(conversations)} examples have a prediction in {output}; run the same command again to predict "
            "the others",
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(128 + received[0]) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"wrote {written} prediction(s) to {output}", soft_wrap=True)
    cut_off, rows = cut_off_count(output)
    if cut_off:
        error_console.print(
            f'warning: {cut_off} of the {rows} replies in {output} are cut off: they reached the token limit without a stop '
            f'token (finish_reason "length"). To let them finish, predict into a new --output with a --max-new-tokens '
            f"above {max_new_tokens}",
            soft_wrap=True,
            markup=False,
        )
    _print_scores(output)


def _print_scores(output: Path) -> None:
    from vlmtune.inference.predict import score_predictions

    scored = score_predictions(output)
    if scored is None:
        console.print("the data has no replies, so the answers are not scored", soft_wrap=True)
        return
    scores, path = scored
    console.print(
        f"against the references of {scores['examples']} example(s): BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f} "
        f"(written to {path})",
        soft_wrap=True,
    )


@app.command()
def export(
    adapter: Annotated[str, typer.Option(help="LoRA adapter folder from `vlmtune train`.")],
    output: Annotated[Path, typer.Option(help="New folder for the merged model (or the adapter copy).")],
    model: Annotated[Optional[str], typer.Option(help="Base model. Default: the adapter's base.")] = None,
    hub: HubOption = "auto",
    adapter_only: Annotated[bool, typer.Option(help="Copy the adapter with a model card instead of merging.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.")] = "5GB",
    dtype: Annotated[str, typer.Option(help="auto (the base model's saved dtype), bfloat16, float16 or float32.")] = "auto",
) -> None:
    """Merge an adapter into its base model (checked by reloading), or copy it with a model card."""
    from vlmtune.config import ModelSettings
    from vlmtune.inference.export import export_adapter_only, export_merged
    from vlmtune.model.loading import adapter_base_model, check_adapter_folder

    check_adapter_folder(adapter)
    if adapter_only:
        folder = export_adapter_only(adapter, str(output))
        console.print(f"adapter and model card written to {folder}", soft_wrap=True)
        return
    base = model or adapter_base_model(adapter)
    if base is None:
        raise VlmtuneError("--model is required: the adapter records no base model")
    check = export_merged(adapter, str(output), ModelSettings(name_or_path=base, hub=hub, device="cpu"), max_shard_size, dtype)
    console.print(f"merged model written to {output}; {check.describe()}", soft_wrap=True)


@app.command()
def serve(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    hub: HubOption = "auto",
    host: Annotated[str, typer.Option(help="Address to bind. 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' on /v1 requests.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id in /v1/models. Default: the adapter or model folder name.")] = None,
    allow_image_url: Annotated[
        Optional[list[str]], typer.Option(help="Allow image URLs starting with this http(s):// or file:// prefix; repeat for several.")
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 4096,
    max_request_mb: Annotated[
        float, typer.Option(min=0.001, help="Largest request body in MiB (1,048,576 bytes; images included).")
    ] = 20.0,
    system: Annotated[
        Optional[str],
        typer.Option(help="System prompt for requests that send none. Default: the training run's (adapter or merged model); '' for none."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat completions, streaming, images)."""
    import uvicorn

    from vlmtune.inference.cli_chat import load_generator, system_prompt_for
    from vlmtune.serving.app import ServerSettings, create_app

    _check_port_free(host, port)
    generator = load_generator(model, adapter, hub, {"max_new_tokens": 1024}, "auto", device)
    name = served_model_name or Path(adapter or model or "model").name
    settings = ServerSettings(
        model_name=name,
        api_key=api_key,
        allowed_image_prefixes=allow_image_url or [],
        max_request_bytes=int(max_request_mb * 1024 * 1024),
        max_tokens_limit=max_tokens_limit,
        system_prompt=system_prompt_for(system, adapter, model),
    )
    console.print(f"serving {name} at http://{host}:{port}/v1", soft_wrap=True)
    uvicorn.run(create_app(generator, settings), host=host, port=port, log_level="info")


@app.command()
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML config file of the run.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="SECTION.KEY=VALUE overrides.")] = None,
    gpu_gib: Annotated[
        Optional[float], typer.Option("--gpu-gib", help="GPU memory to compare with, in GiB (with --device cuda). Default: 24.")
    ] = None,
    images: Annotated[int, typer.Option(help="Images per sample, each of data.max_pixels pixels. 0: text only.")] = 1,
    device: Annotated[
        Optional[str],
        typer.Option(help="cuda (adds the CUDA context overhead) or cpu. Default: cpu if the config's model.device is cpu, else cuda."),
    ] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the estimate to this JSON file.")] = None,
) -> None:
    """Estimate the per-device memory of a training run from the model config, without loading weights."""
    from vlmtune.config import load_config
    from vlmtune.model.estimate_report import estimate_table, run_estimate, write_estimate_json

    if device not in ("cuda", "cpu", None):
        raise VlmtuneError(f"--device: expected cuda or cpu, got {device!r}")
    if images < 0:
        raise VlmtuneError(f"--images: expected 0 or more images per sample, got {images}")
    if gpu_gib is not None and gpu_gib <= 0:
        raise VlmtuneError(f"--gpu-gib: expected a positive size in GiB, got {gpu_gib}")
    if device == "cpu" and gpu_gib is not None:
        raise VlmtuneError("--gpu-gib compares with GPU memory, so it does not apply with --device cpu; drop one of them")
    run_config = load_config(config, overrides)
    if device is None:
        # A GPU-size question (--gpu-gib) is about a GPU even when the config trains on CPU.
        device = "cpu" if run_config.model.device == "cpu" and gpu_gib is None else "cuda"
    if device == "cuda" and gpu_gib is None:
        gpu_gib = 24.0
    report = run_estimate(run_config, images_per_sample=images, device=device, gpu_gib=gpu_gib)
    console.print(estimate_table(report))
    if json_path is not None:
        write_estimate_json(report, json_path)
        console.print(f"estimate written to {json_path}", soft_wrap=True)


data_app = typer.Typer(no_args_is_help=True, help="Look at the training data before training.")
app.add_typer(data_app, name="data")


@data_app.command("stats")
def data_stats(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="SECTION.KEY=VALUE overrides.")] = None,
    png: Annotated[
        Optional[Path],
        typer.Option(
            help="Histogram PNG path. Default: length_histogram.png in train.output_dir, where training neither "
            "counts it as an earlier run nor deletes it with --overwrite.",
        ),
    ] = None,
) -> None:
    """Print token-length statistics per dataset, with a histogram in the terminal and as a PNG."""
    from vlmtune.config import load_config

    run_config = load_config(config, overrides)
    from vlmtune.data.loading import load_data
    from vlmtune.outputs import LENGTH_HISTOGRAM, probe_writable

    # The PNG's path is checked before the data is read and encoded, which can take minutes.
    target = png or Path(run_config.train.output_dir) / LENGTH_HISTOGRAM
    if target.suffix.lower() != ".png":
        raise VlmtuneError(f"--png {target}: the histogram is a PNG image, so give a path ending in .png")
    try:
        probe_writable(target.parent)
    except OSError as error:
        raise VlmtuneError(f"--png {target}: cannot write there ({error.strerror or error}); choose a path you can write to") from None
    data = load_data(run_config.data)
    conversations = data.train
    from vlmtune.encoding.encode import encode_conversations, overlength_reason
    from vlmtune.encoding.stats import length_stats, stats_table, text_histogram, write_histogram_png

    encoder = _encoder_for(run_config)
    # data.on_overlength as in training (trimmed examples are counted as trimmed), except that `error`
    # counts the long examples instead of stopping at the first.
    policy = run_config.data.on_overlength
    max_length = run_config.data.max_length
    if policy == "error":
        report = encode_conversations(
            encoder, conversations, run_config.data.model_copy(update={"on_overlength": "drop"}), log=False
        )
        too_long = report.dropped.pop(overlength_reason(max_length), [])
        report.log()
    else:
        report = encode_conversations(encoder, conversations, run_config.data)
    console.print(stats_table(length_stats(report.lengths, max_length), max_length))
    if data.validation:
        console.print(
            f"the table counts the training split only; {len(data.validation)} validation example(s) "
            "(data.val_size or data.validation) are not in it",
            soft_wrap=True,
        )
    examples = sum(len(values) for values in report.lengths.values())
    too_long_dropped = len(report.dropped.get(overlength_reason(max_length), []))
    if policy != "error" and (report.trimmed or too_long_dropped):
        console.print(
            f"with data.on_overlength={policy}, training uses {len(report.samples)} of these {examples} examples: "
            f"{report.trimmed} with their oldest turns removed to fit, {too_long_dropped} dropped as longer than "
            f"data.max_length={max_length}"
        )
    if policy == "error" and too_long:
        console.print(
            f"{len(too_long)} sample(s) are longer than data.max_length={max_length}, and data.on_overlength=error "
            f"stops training at the first ({too_long[0]}). Raise data.max_length, or set data.on_overlength to drop "
            "or trim_history."
        )
    every_length = [length for values in report.lengths.values() for length in values]
    console.print(text_histogram(every_length), markup=False, highlight=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"histogram written to {write_histogram_png(report.lengths, max_length, target)}", soft_wrap=True)


def _encoder_for(run_config):
    """Build a ConversationEncoder from the config's processor and generation config, without the weights."""
    from vlmtune.encoding import ConversationEncoder
    from vlmtune.model.loading import load_processor_and_stop_ids

    processor, stop_ids = load_processor_and_stop_ids(run_config.model)
    return ConversationEncoder.from_settings(processor, stop_ids, run_config.data)


@app.command()
def chat(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    hub: HubOption = "auto",
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Ask once, print the reply and exit.")] = None,
    image: Annotated[Optional[list[str]], typer.Option(help="Image path or URL for --message (without it, for the first message); repeat for several.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt. Default: the training run's (adapter or merged model); '' for none.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Maximum tokens per reply.")] = 1024,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature (with --sample); 0 decodes greedily.")] = 0.7,
    top_p: Annotated[float, typer.Option(max=1, help="Nucleus sampling mass, above 0 and at most 1 (with --sample).")] = 0.9,
    show_thinking: Annotated[bool, typer.Option(help="Also print the reasoning of thinking models.")] = False,
    thinking: Annotated[
        Literal["auto", "think_answer", "think", "none"],
        typer.Option(help="Reply layout. auto: the adapter's, else detected from the tokenizer and chat template."),
    ] = "auto",
    device: DeviceOption = "auto",
) -> None:
    """Chat with a model and optional adapter: interactive, or one-shot with --message."""
    from vlmtune.config import GenerationSettings
    from vlmtune.inference.cli_chat import run_chat

    run_chat(
        model=model,
        adapter=adapter,
        hub=hub,
        message=message,
        images=image or [],
        system=system,
        generation={
            "max_new_tokens": max_new_tokens,
            "do_sample": sample and temperature > 0,
            # Sampling at temperature 0 is greedy decoding, which ignores the temperature.
            "temperature": temperature if temperature > 0 else GenerationSettings().temperature,
            "top_p": top_p,
            "show_thinking": show_thinking,
        },
        thinking=thinking,
        device=device,
        console=console,
    )


@app.command()
def webui(
    model: ModelOption = None,
    adapter: AdapterOption = None,
    hub: HubOption = "auto",
    outputs: Annotated[Path, typer.Option(help="Folder searched for adapters and used for new runs.")] = Path("outputs"),
    presets: Annotated[Path, typer.Option(help="Folder of YAML presets for the Train tab.")] = Path("configs"),
    host: Annotated[str, typer.Option(help="Address to bind. 0.0.0.0 exposes the page to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 7860,
    auth: Annotated[Optional[str], typer.Option(help="Require a login, given as USER:PASSWORD.")] = None,
    share: Annotated[bool, typer.Option(help="Also publish the page through a public Gradio share link.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Starting value of the Chat tab's max new tokens per reply.")] = 512,
    device: DeviceOption = "auto",
) -> None:
    """Open a web page to chat with a model and adapter, and to start and follow training runs."""
    from vlmtune.model.loading import adapter_base_model, check_adapter_folder

    try:
        from vlmtune.webui.app import WebUISettings, launch
    except ImportError as error:
        raise VlmtuneError(f"the web UI needs gradio ({error}); install it with pip install -e '.[webui]'") from None
    if adapter:
        check_adapter_folder(adapter)
    base = model or (adapter_base_model(adapter) if adapter else None)
    if base is None:
        raise VlmtuneError("--model is required unless --adapter names a folder whose adapter_config.json records its base model")
    _check_port_free(host, port)
    settings = WebUISettings(
        model=base,
        adapter=adapter,
        outputs_dir=str(outputs),
        presets_dir=str(presets),
        hub=hub,
        device=device,
        max_new_tokens=max_new_tokens,
    )
    launch(settings, host=host, port=port, auth=auth, share=share)


def main() -> None:
    # peft calls a transformers property that transformers 5 deprecates; the warning is
    # about their code, not the user's, so the CLI hides it.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    # peft 0.21.2 adds a `.*\.gate_up_proj` rank/alpha pattern itself when it moves MoE targets to
    # fused expert tensors (GLM-4.5V), then warns that the key matched no module and was ignored,
    # although the fused tensor's LoRA weights have that rank. Only that exact key is hidden.
    warnings.filterwarnings(
        "ignore",
        message=r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
        r"\['\.\*\\\\\.gate_up_proj'\]",
        category=RuntimeWarning,
    )
    try:
        app()
    except VlmtuneError as error:
        error_console.print(Text.assemble(("error: ", "bold red"), str(error)), highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
